"""Prepare pretrained encoder weights for --pretrained-vision / --pretrained-audio.

  groupemotion weights convert SRC DEST

turns a PyTorch pickle into safetensors, the only format the model loads: SRC is a directory
in the hub layout (pytorch_model.bin, config.json, preprocessor_config.json, as `hf download`
leaves it), which becomes the directory DEST; or a single timm .pth/.bin/.pt file, which becomes
DEST when it ends in .safetensors, else DEST/model.safetensors. The pickle is read by torch's
weights-only unpickler only (nothing in it runs), every tensor is compared with the file
written, and the sha256 of that file is printed. Needs torch 2.10 or newer.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    convert = actions.add_parser(
        "convert", help="convert a PyTorch pickle (hub directory or timm file) to safetensors",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("src", metavar="SRC", help="pytorch_model.bin directory, or a .pth/.bin/.pt file")
    convert.add_argument("dest", metavar="DEST", help="output directory, or a .safetensors file for a file SRC")


def run(args: argparse.Namespace) -> int:
    from groupemotion_core.weights.convert import convert

    done = convert(args.src, args.dest)
    size_mb = done.weights.stat().st_size / 1e6
    print(f"wrote {done.weights}: {done.tensors} tensors, {size_mb:.1f} MB, each one read back and identical")
    if done.copied:
        print(f"copied {', '.join(done.copied)} to {done.weights.parent}")
    print(f"{done.sha256}  {done.weights}")
    return 0


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("weights")
