"""Which EfficientNet-Lite0 layer keeps an easy-VQA image's colour? A linear probe (multinomial logistic
regression, L-BFGS, L2 1e-3, features standardised on the training images) of the colour and the shape of
easy-VQA images from the frozen packaged EfficientNet-Lite0's outputs at each layer (`feature_layer`,
docs/docking.md), at the size the quickstart reads (64x64: 2x2 positions at and above block 12), the
positions' vectors concatenated. It shows what a layer's features hold, linearly; not what a connector and
decoder trained on them learn to use.

    python scripts/feature_layer_probe.py          # blocks 9, 12, 14, 16, the head (17), and 12+17 together
    python scripts/feature_layer_probe.py --layers 12 16+17 --train 1000 --test 500
    python scripts/feature_layer_probe.py --layers 17 --image-size 128 --slot-grid 2   # 4x4 map pooled to 2x2
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from metalm.data.easy_vqa import easy_vqa_image_labels, easy_vqa_root
from metalm.modalities.vision import image_preprocessor_for, pool_slots
from metalm.model.vision import EfficientNetLite0Encoder


def layer_features(
    split: str, limit: int, layers: set[int], size: int, grid: int | None = None
) -> tuple[dict, list, list]:
    """`{layer: [N, positions * channels]}` for the first `limit` images of `split` (each map average-pooled
    to `grid` x `grid` positions as a vision encoder's `slot_grid` does), with their colours and shapes (None
    where the package's questions leave one unknown)."""
    labels = easy_vqa_image_labels(split)
    folder = easy_vqa_root() / split / "images"
    ids = sorted(labels)[:limit]
    prepare = image_preprocessor_for({"backbone": "efficientnet_lite0", "image_size": size})
    pixels = prepare([Image.open(folder / f"{i}.png").convert("RGB") for i in ids])
    encoder = EfficientNetLite0Encoder.from_packaged()
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        maps = pixels
        for index, layer in enumerate(encoder.layers):
            maps = layer(maps)
            if index in layers:
                out[index] = pool_slots(encoder.tokens([maps]), grid).flatten(1)
    return out, [labels[i].color for i in ids], [labels[i].shape for i in ids]


def probe_accuracy(train: torch.Tensor, train_y: list, test: torch.Tensor, test_y: list) -> float:
    """Test accuracy (%) of a logistic regression fitted on the training rows whose label is known."""
    keep = [i for i, y in enumerate(train_y) if y is not None]
    classes = sorted({train_y[i] for i in keep})
    x, y = train[keep], torch.tensor([classes.index(train_y[i]) for i in keep])
    mean, std = x.mean(0), x.std(0) + 1e-5
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    held = [i for i, label in enumerate(test_y) if label in classes]
    predicted = (((test[held] - mean) / std) @ weight + bias).argmax(1)
    gold = torch.tensor([classes.index(test_y[i]) for i in held])
    return 100.0 * float((predicted == gold).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", nargs="+", default=["9", "12", "14", "16", "17", "12+17"], help="N, or N+M: concatenated"
    )
    parser.add_argument("--train", type=int, default=4000, help="training-split images")
    parser.add_argument("--test", type=int, default=1000, help="test-split images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--slot-grid", type=int, default=None, help="pool each map to G x G (slot_grid)")
    args = parser.parse_args(argv)
    groups = {name: [int(index) for index in name.split("+")] for name in args.layers}
    needed = {index for indices in groups.values() for index in indices}
    train, train_colour, train_shape = layer_features(
        "train", args.train, needed, args.image_size, args.slot_grid
    )
    test, test_colour, test_shape = layer_features("test", args.test, needed, args.image_size, args.slot_grid)
    pooled = "" if args.slot_grid is None else f", maps pooled to {args.slot_grid}x{args.slot_grid}"
    print(
        f"{args.train} training and {args.test} test images of easy-VQA at {args.image_size}x{args.image_size}"
        + pooled
    )
    print("| layer | features | colour (%) | shape (%) |\n|---:|---:|---:|---:|")
    for name, indices in groups.items():
        x, held = torch.cat([train[i] for i in indices], 1), torch.cat([test[i] for i in indices], 1)
        colour = probe_accuracy(x, train_colour, held, test_colour)
        shape = probe_accuracy(x, train_shape, held, test_shape)
        print(f"| {name} | {x.shape[1]} | {colour:.1f} | {shape:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
