"""Zero-shot CLIP with several hand-written templates: how far a few words move the accuracy.

    python tools/templates.py                       # the toy world, the notes' five templates
    python tools/templates.py --dataset eurosat --root ~/data --backbone ViT-B/16
    python tools/templates.py --dataset dtd --root ~/data --templates my_templates.txt

The notes' case for learned prompts rests on this claim: a hand-written template is found by
trial and error (人肉调参, prompt engineering), and a few words' change ("a photo of a {}." ->
"a close-up photo of a {}.") moves zero-shot accuracy a lot. This measures it: zero-shot CLIP
(zeroshot.py) once per template, on the test split of all classes of any dataset train.py
reads, then each template's accuracy, the spread (best - worst) and the best and worst
template. The test images are encoded once; each template re-encodes only the class names.
The numbers are train.py's: `python train.py --method zeroshot --protocol fewshot --template T`
gives the same accuracy for T (the same loader, batches and precision).

--templates FILE: one template per line, "{}" where the class name goes; empty lines and lines
starting with "#" are skipped. The dataset's own template (CoOp's CUSTOM_TEMPLATES, what
train.py --method zeroshot uses by default) is printed for reference.

Shape legend: B images in a batch, n_cls classes, E joint embedding dim.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clip  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import runs  # noqa: E402
from runs import UsageError  # noqa: E402
import zeroshot  # noqa: E402

# The five templates the notes list.
NOTES_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a close-up photo of a {}.",
                   "this is a photo of the {}.", "a satellite photo of a {}."]

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", default="toy", help=f"{', '.join(data.DATASETS)} (default: toy)")
parser.add_argument("--root", default=config.RUN["root"], help="data root; for 'folder' the "
                    f"folder itself (default: {config.RUN['root']})")
parser.add_argument("--backbone", help=f"{', '.join(clip.available_models())} or a checkpoint "
                    "file (default: toy for the toy dataset, else ViT-B/16)")
parser.add_argument("--templates", metavar="FILE", help="templates, one per line (default: the "
                    "notes' five: " + " | ".join(NOTES_TEMPLATES) + ")")
parser.add_argument("--device", default=config.RUN["device"], help="cpu or cuda (default: "
                    f"{config.RUN['device']})")
parser.add_argument("--batch-size", default=config.RUN["eval_batch_size"],
                    type=config.number(int, high=config.MAX_BATCH + 1),
                    help=f"test images per batch (default: {config.RUN['eval_batch_size']}, "
                    "train.py's)")
parser.add_argument("--workers", default=config.RUN["workers"], type=config.number(
                    int, -1, config.MAX_WORKERS + 1, what=f"0 to {config.MAX_WORKERS}"),
                    help=f"data-loading processes (default: {config.RUN['workers']})")


def read_templates(path):
    """The templates of a file, one per line; each holds one "{}" for the class name."""
    lines = [(i, line.strip()) for i, line in
             enumerate(runs.read_text(path, "--templates").split("\n"), 1)]
    templates = [(i, t) for i, t in lines if t and not t.startswith("#")]
    if not templates:
        raise UsageError(f"--templates {path}: no template in the file (one per line)")
    for i, t in templates:
        try:
            clip.check_template(t)
        except ValueError as e:
            raise UsageError(f"--templates {path}, line {i}: {e}") from None
    return [t for _, t in templates]


@torch.no_grad()
def image_features(clip_model, loader, device, amp):
    """The test images' normalised features, once for every template: [(f (B, E), labels)]."""
    out = []
    for images, labels in loader:
        with amp:
            out.append((F.normalize(clip_model.encode_image(images.to(device)), dim=-1),
                        labels))  # (B, E), (B,)
    if not out:
        raise data.DataError("no readable test images: every one was skipped as unreadable")
    return out


@torch.no_grad()
def accuracy(clip_model, classnames, template, feats, amp):
    """Top-1 accuracy in percent of zero-shot CLIP with one template: ZeroShot's classifier and
    logits (zeroshot.py) on the stored image features."""
    model = zeroshot.ZeroShot(clip_model, classnames, template)
    with amp:
        g = model.text_features()  # (n_cls, E)
    correct = total = 0
    for f, labels in feats:
        with amp:
            logits = clip_model.logit_scale.exp() * f @ g.t()  # (B, n_cls), as ZeroShot.forward
        correct += (logits.argmax(dim=-1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def main(argv=None):
    args = parser.parse_args(argv)
    templates = read_templates(args.templates) if args.templates else NOTES_TEMPLATES
    config.check_device(args.device)
    backbone = args.backbone or ("toy" if args.dataset == "toy" else config.RUN["backbone"])
    ds = data.load(args.dataset, args.root)  # all classes; the test split is never sampled
    if not ds.test:
        raise data.DataError(f"{ds}: no test images to evaluate")
    clip_model, _ = clip.load(backbone, args.device)
    config.check_vocabulary(clip_model, backbone)
    # train.py's precision: bf16 autocast on a GPU that has it, else fp32
    cuda = args.device.startswith("cuda")
    amp = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                         enabled=cuda and torch.cuda.is_bf16_supported())
    loader = data.make_loader(ds.test, clip_model.visual.input_resolution, args.batch_size,
                              False, args.workers)
    feats = image_features(clip_model, loader, args.device, amp)
    acc = {t: accuracy(clip_model, ds.classnames, t, feats, amp) for t in templates}
    best, worst = max(acc, key=acc.get), min(acc, key=acc.get)
    n = sum(len(labels) for _, labels in feats)
    print(f"zero-shot CLIP, backbone {backbone}, {args.dataset}: {len(ds.classnames)} classes, "
          f"{n} test images (the dataset's own template: {ds.template!r})")
    print(f"{'accuracy':>9}  template")
    for t, a in acc.items():
        print(f"{a:9.2f}  {t}")
    spread = acc[best] - acc[worst]
    print(f"spread {spread:.2f} points: best {best!r} ({acc[best]:.2f}), worst {worst!r} "
          f"({acc[worst]:.2f})")
    return dict(accuracy=acc, spread=spread, best=best, worst=worst)


if __name__ == "__main__":
    runs.run_cli(main)
