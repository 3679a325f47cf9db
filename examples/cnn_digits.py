"""Train a small ResNet on scikit-learn's bundled digits images, dense against N:M sparse
convolutions, and print the test accuracy of each recipe.

    python examples/cnn_digits.py [--steps 300] [--seed 0] [--recipes dense "Bi-Mask"]

The recipes (``nmcompile.demo.digits.RECIPES``): ``dense`` (eager), ``2:4 transposable``
(one mask per weight for the forward and grad-input convolutions), ``Bi-Mask`` (a row-wise
forward mask and a permuted backward mask), ``2:4 + dense tail`` (transposable, dense for the
last 30% of the steps). Every convolution whose input channels are a multiple of 4 is trained
sparse (not the one-channel stem); the data ship with scikit-learn (``pip install
scikit-learn``), nothing is downloaded. About two minutes on one CPU core at the defaults.
"""

from __future__ import annotations

import argparse

import torch

from nmcompile.demo.digits import RECIPES, DigitsConfig, load_digits_split, train_digits


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DigitsConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest for this small model on a busy "
                             "machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_digits_split()
    print(f"digits: {len(data[1])} training and {len(data[3])} test images of 8x8")
    results = []
    for recipe in args.recipes:
        result = train_digits(recipe, DigitsConfig(steps=args.steps, seed=args.seed), data)
        results.append(result)
        print(f"{recipe:>18}: test accuracy {100 * result['test_accuracy']:.2f}%  "
              f"({len(result['masked'])} weights sparse, {result['wall_s']} s)")
    return results


if __name__ == "__main__":
    main()
