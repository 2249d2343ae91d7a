"""What conditioning on the image buys, measured (CoCoOp): the size of the image-dependent part of
the context, and the accuracy left when it is taken away.

    python tools/conditioning.py out/toy/cocoop/toy_16shots_base2new/seed1
    python tools/conditioning.py RUN [RUN ...] --json conditioning.json

CoCoOp (cocoop.py) adds one meta-net token to every context vector: v_m(x) = v_m + pi(x), with
pi(x) = h_theta(x) from the image feature. Over the test images x of each half (base and new;
all for fewshot), with pibar the mean of pi(x) over them:

    v_m(x) = (v_m + pibar) + (pi(x) - pibar)      the constant part + the image-dependent part
    size       mean_x ||pi(x) - pibar||  against  ||v_m + pibar||, m = 1..M (and ||pibar||)
    ablation   accuracy with pi(x) as trained; with pi(x) replaced by pibar, which makes CoCoOp
               a static prompt (CoOp with context v_m + pibar); and by 0 (the context v alone)

If the meta-net conditions on the image, replacing pi(x) by pibar costs accuracy; if it does
not, pibar gives the same predictions and the meta-net only learned a constant shift. "changed"
counts the test images whose predicted class differs from the trained model's. pibar is each
half's own mean (it sees that half's test images, as the ablation asks; no label is used).

The replacement is a forward hook on prompt_learner.meta_net that returns pibar (or 0) instead of
its output, so everything else runs the model's own forward (cocoop.py) unchanged; the same hook
records pi(x) in the as-trained pass. The model is rebuilt and fed as tools/distortion.py does
(train.build_model, the test transform, the run's eval batch size, fp32): on the CPU the
as-trained accuracy is results.json's. Norms are in the text tower's token-embedding space
(D = 512 for ViT-B/16).

Shape legend: B images in a batch, N test images of a half, M context vectors, D text width.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import torch  # noqa: E402

import data  # noqa: E402
import config  # noqa: E402
import runs  # noqa: E402
from runs import UsageError  # noqa: E402
from tools.distortion import open_run, read_halves, rebuild  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="CoCoOp train.py output folders")
parser.add_argument("--root", help="the data root, when the runs' data moved (default: the "
                    "root each run saved)")
parser.add_argument("--device", default=config.RUN["device"])
parser.add_argument("--workers", default=config.RUN["workers"], type=config.number(
                    int, -1, config.MAX_WORKERS + 1, what=f"0 to {config.MAX_WORKERS}"),
                    help=f"data-loading processes (default: {config.RUN['workers']})")
parser.add_argument("--json", metavar="OUT", help="write every number to this JSON file")


@torch.no_grad()
def predict(model, loader, device, pi=None):
    """Predicted classes over `loader` with the meta-net's output replaced by `pi` (D,), or as
    trained (None) -> (predictions (N,), labels (N,), the meta-net's own outputs pi(x) (N, D))."""
    seen, predictions, labels = [], [], []

    def hook(module, inputs, output):  # output: pi(x) (B, D)
        seen.append(output.detach().float().cpu())
        return None if pi is None else pi.to(output).expand_as(output)  # (B, D)

    handle = model.prompt_learner.meta_net.register_forward_hook(hook)
    try:
        for images, y in loader:
            logits = model(images.to(device))  # (B, n_cls)
            predictions.append(logits.argmax(dim=-1).cpu())
            labels.append(y)
    finally:
        handle.remove()
    return torch.cat(predictions), torch.cat(labels), torch.cat(seen)  # (N,), (N,), (N, D)


def measure_half(model, ds, n_px, batch_size, device, workers=0):
    """One half's test images: norms of both parts of the context, accuracy under each pi."""
    model.eval()
    loader = data.make_loader(ds.test, n_px, batch_size, False, workers)
    trained, labels, pis = predict(model, loader, device)  # pis: (N, D)
    pibar = pis.mean(dim=0)  # (D,)
    mean_pred = predict(model, loader, device, pibar)[0]  # (N,)
    zero_pred = predict(model, loader, device, torch.zeros_like(pibar))[0]  # (N,)
    ctx = model.prompt_learner.ctx.detach().float().cpu()  # (M, D)
    varying = (pis - pibar).norm(dim=-1)  # (N,)   ||pi(x) - pibar||
    constant = (ctx + pibar).norm(dim=-1)  # (M,)   ||v_m + pibar||

    def acc(pred):  # as train.evaluate: 100 * correct / total
        return 100.0 * int((pred == labels).sum()) / len(labels)
    return dict(
        images=len(labels), varying_mean=varying.mean().item(), varying_max=varying.max().item(),
        pibar_norm=pibar.norm().item(), ctx_norm=ctx.norm(dim=-1).tolist(),
        constant_norm=constant.tolist(), ratio=(varying.mean() / constant.mean()).item(),
        accuracy=acc(trained), accuracy_mean_pi=acc(mean_pred), accuracy_zero_pi=acc(zero_pred),
        changed_mean_pi=int((mean_pred != trained).sum()),
        changed_zero_pi=int((zero_pred != trained).sum()))


def measure(path, args):
    cfg, state = open_run(path)
    if cfg["method"] != "cocoop":
        raise UsageError(f"{path} holds {cfg['method']} prompts: tools/conditioning.py measures "
                         "CoCoOp's meta-net (train.py --method cocoop)")
    halves = read_halves(cfg, args.root)
    models, n_px = rebuild(cfg, state, halves, args.device)
    return dict(run=path, **{k: cfg[k] for k in ("method", "dataset", "backbone", "seed",
                                                 "epochs")},
                halves={k: measure_half(models[k], ds, n_px, cfg["eval_batch_size"], args.device,
                                        args.workers) for k, ds in halves.items()})


def print_run(r):
    first = next(iter(r["halves"].values()))
    print(f"\n{r['method']} | {r['dataset']} | seed {r['seed']} | {r['epochs']} epochs | "
          f"backbone {r['backbone']} | {r['run']}")
    print(f"context v_m(x) = (v_m + pibar) + (pi(x) - pibar), M = {len(first['ctx_norm'])}; "
          "pibar: the mean of pi(x) over the half's test images")
    print(f"{'half':<5} {'images':>6}  {'|pi(x)-pibar| mean (max)':>24}  {'|pibar|':>7}  "
          "|v_m + pibar|, m=1..M   (|v_m|)   ratio")
    for name, h in r["halves"].items():
        print(f"{name:<5} {h['images']:>6}  {h['varying_mean']:>13.4f} ({h['varying_max']:.4f})"
              f"  {h['pibar_norm']:7.4f}  " + " ".join(f"{v:.3f}" for v in h["constant_norm"]) +
              "   (" + " ".join(f"{v:.3f}" for v in h["ctx_norm"]) + f")   {h['ratio']:.4f}")
    print("accuracy  as trained   pi(x) -> pibar (changed)   pi(x) -> 0 (changed)")
    for name, h in r["halves"].items():
        n = h["images"]
        print(f"{name:<8} {h['accuracy']:11.2f}   {h['accuracy_mean_pi']:14.2f} "
              f"({h['changed_mean_pi']} of {n})   {h['accuracy_zero_pi']:10.2f} "
              f"({h['changed_zero_pi']} of {n})")


def main(argv=None):
    args = parser.parse_args(argv)
    if args.json and not args.json.endswith(".json"):
        raise UsageError(f"--json {args.json}: name a .json file")
    config.check_device(args.device)
    results = []
    for path in args.runs:
        results.append(measure(path, args))
        print_run(results[-1])
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        except OSError as e:  # no such folder, a folder of that name, no permission
            raise UsageError(f"--json {args.json}: cannot write it ({e.strerror})") from None
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    runs.run_cli(main)
