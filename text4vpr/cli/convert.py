"""`text4vpr convert-upstream CKPT.pth [TEXT.pth] --dinov2 DIR --t5 DIR --out DIR`."""

from __future__ import annotations

from text4vpr.cli.arg_types import out_folder


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", nargs="+",
                        help="published Text4VPR .pth (image_/text_encoder_state_dict), or two files: "
                             "the image encoder's and the text encoder's bare state_dict")
    parser.add_argument("--dinov2", required=True, help="local Hugging Face DINOv2 folder (config)")
    parser.add_argument("--t5", required=True, help="local Hugging Face T5 folder (config, tokenizer)")
    parser.add_argument("--out", required=True, type=out_folder, help="output folder (config.json + model.safetensors + conversion.json)")
    parser.add_argument("--trainable-blocks", type=int, default=2, help="DINOv2 blocks trained on fine-tuning")


def run(args) -> int:
    from text4vpr.models.upstream import convert_upstream

    model, report = convert_upstream(args.checkpoint, args.dinov2, args.t5, args.out, args.trainable_blocks)
    n = sum(p.numel() for p in model.parameters())
    dropped = report["dropped_unused"]
    if dropped:
        print(f"dropped {len(dropped)} upstream tensors its forward never uses (listed in {args.out}/conversion.json): "
              + ", ".join(dropped[:4]) + (", ..." if len(dropped) > 4 else ""))
    print(f"wrote {args.out} ({n / 1e6:.1f} M parameters, config hash {model.config_hash()})")
    return 0
