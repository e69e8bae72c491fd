"""Fine-tune a ResNet backbone from a torchvision-format state dict on a local file.

    .venv/bin/python examples/finetune_resnet.py --weights resnet18-f37072fd.pth
    .venv/bin/python examples/finetune_resnet.py                    # writes a stand-in file

The weights file is what torchvision's model zoo downloads (or `distbelief export` writes): a
plain state dict of a 1000-class ResNet-18. distbelief's resnet18 has torchvision's module
names, so it loads the file with strict=True; the 1000-class head is then replaced by one for
the task, and the whole network is fine-tuned with `distbelief.fit` (any mode) on the 8x8
digits of scikit-learn, upsampled to 32x32 RGB. Without --weights the script first writes a
stand-in file from torchvision's (untrained) resnet18, since this machine may be offline.
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import distbelief


def digits_rgb32():
    """The digits as 3 x 32 x 32 tensors in [0, 1], split 1,437 / 360 by a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return (x[perm[:1437]], y[perm[:1437]]), (x[perm[1437:]], y[perm[1437:]])


def backbone(weights: Path, classes: int) -> torch.nn.Module:
    model = distbelief.create_model("resnet18", num_classes=1000)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True),
                          strict=True)
    model.fc = torch.nn.Linear(model.fc.in_features, classes)  # a new head for the task
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="torchvision-format resnet18 state dict")
    parser.add_argument("--mode", default="single", choices=("single", "downpour"))
    parser.add_argument("--iterations", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)  # the stand-in weights and the new head: the same run every time
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            import torchvision

            weights = Path(tmp) / "resnet18.pth"
            torch.save(torchvision.models.resnet18().state_dict(), weights)
        model = backbone(weights, classes=10)
        train, test = digits_rgb32()
        settings = dict(replicas=2, ps_shards=2) if args.mode == "downpour" else {}
        summary = distbelief.fit(model, train, test_data=test, mode=args.mode,
                                 iterations=args.iterations, batch_size=32, lr=0.02,
                                 momentum=0.9, eval_every=args.iterations, **settings)
    print(f"fine-tuned resnet18 ({args.mode}): test accuracy {summary['test_accuracy']:.2%} "
          f"after {summary['iterations']} iterations in {summary['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
