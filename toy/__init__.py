"""The embedded toy world: a procedural image world (`toy.world`) and the script that pretrains
a tiny CLIP on it (`toy.pretrain`), so the whole CLIP -> CoOp -> CoCoOp -> MaPLe story runs on a
laptop CPU, offline, in about a minute."""
