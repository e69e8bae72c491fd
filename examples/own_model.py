"""Your own model on your own data with Downpour SGD, Sandblaster L-BFGS or synchronous SGD.

A small classifier of tabular data (scikit-learn's wine: 13 measurements, 3 cultivars), a
module defined right here, trained through `distbelief.fit` in any mode:

    .venv/bin/python examples/own_model.py                      # Downpour, 2 replicas x 2 shards
    .venv/bin/python examples/own_model.py --mode sandblaster   # L-BFGS on the whole split
    .venv/bin/python examples/own_model.py --mode sync          # 2 workers on Ray Train
    .venv/bin/python examples/own_model.py --mode single --out runs/wine

The module's class lives in this script, so Ray ships it to the replicas by value.
"""

import argparse

import torch
from sklearn.datasets import load_wine

import distbelief


class WineNet(torch.nn.Module):
    def __init__(self, features: int = 13, hidden: int = 32, classes: int = 3):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def wine_splits():
    x, y = load_wine(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return (x[perm[:140]], y[perm[:140]]), (x[perm[140:]], y[perm[140:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="downpour", choices=("single", "downpour", "sandblaster",
                                                              "sync"))
    parser.add_argument("--out", help="run directory (default: none)")
    args = parser.parse_args()
    train, test = wine_splits()
    if args.mode == "sandblaster":  # full-batch L-BFGS: the whole split is one batch
        settings = dict(batch_size=0, iterations=30, lr=1.0)
    else:
        settings = dict(batch_size=16, iterations=300, lr=0.05)
    if args.mode == "sync":
        settings.update(replicas=2)
    elif args.mode != "single":  # the default momentum 0.9: the shards correct for staleness
        settings.update(replicas=2, ps_shards=2)
    model = WineNet()
    summary = distbelief.fit(model, train, test_data=test, mode=args.mode, run_dir=args.out,
                             eval_every=100, log_every=50, **settings)
    check = distbelief.evaluate(model, test)  # the module now holds the trained weights
    print(f"{args.mode}: test accuracy {summary['test_accuracy']:.2%} after "
          f"{summary['iterations']} iterations in {summary['wall_s']:.1f} s "
          f"(re-evaluated: {check['accuracy']:.2%})")


if __name__ == "__main__":
    main()
