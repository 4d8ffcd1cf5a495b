"""Export a trained model as a SavedModel for TF Serving (versioned layout EXPORT_BASE/N/).

    python export/export_saved_model.py --model_dir runs/shapes --output exports/shapes
    mrcnn-export --model_dir runs/shapes --output exports/shapes      # the same
    python export/export_saved_model.py --checkpoint runs/x/checkpoints/ckpt-500 \
        --config configs/shapes.yaml --output exports/shapes --version 3 \
        --input_type image_tensor,image_bytes,tf_example --max_detections 100 --mask_output full

``--format onnx`` writes OUTPUT/N/model.onnx (and labels.json) instead: the image_tensor path
converted by tf2onnx, with ``model.nms_impl=static`` and ``--mask_output`` box (the default
there) or full. ``--format litert --image_size H,W`` writes OUTPUT/N/model.tflite, builtin ops
only, for uint8 [1, H, W, 3] images, with ``model.nms_impl=static``,
``model.roi_align.impl=gather`` and box masks. Both need ``pip install -e ".[export]"``; see
mrcnn_tf/export_formats.py.

--model_dir takes the run's config.json, labels.json and latest checkpoint. With --checkpoint the
labels come from the config's eval source (the COCO annotation file, or the synthetic classes).
--input_type, --max_detections, --mask_output and --max_image_pixels default to the config's
export section.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mrcnn_tf.cli import quiet
from mrcnn_tf.config import MASK_OUTPUTS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_dir", help="a train.py run directory")
    src.add_argument("--checkpoint", help="a checkpoint prefix (with --config)")
    p.add_argument("--config", help="YAML config of the checkpoint")
    p.add_argument("--output", required=True, help="export base; the model goes to OUTPUT/N")
    p.add_argument("--version", type=int, default=None, help="default: the next free number")
    p.add_argument("--input_type", default=None,
                   help="comma list of image_tensor, image_bytes, tf_example (default: "
                        "export.input_types); the first is serving_default")
    p.add_argument("--max_detections", type=int, default=None,
                   help="detections per image (default: export.max_detections)")
    p.add_argument("--mask_output", default=None, choices=MASK_OUTPUTS,
                   help="full-resolution uint8 masks, 28x28 per box, or one PNG per detection "
                        "(default: export.mask_output)")
    p.add_argument("--max_image_pixels", type=int, default=None,
                   help="refuse encoded images with more pixels (default: "
                        "export.max_image_pixels)")
    p.add_argument("--format", default="saved_model", choices=("saved_model", "onnx", "litert"),
                   help="a TF Serving SavedModel, an ONNX model or a LiteRT (.tflite) model "
                   "(the last two need the export extra)")
    p.add_argument("--image_size", default=None, metavar="H,W",
                   help="--format litert: the fixed input size, e.g. 480,640")
    p.add_argument("--set", nargs="*", default=[], help="config overrides")
    args = p.parse_args(argv)
    quiet()

    from mrcnn_tf.checkpoint import restore
    from mrcnn_tf.config import ConfigError, load_config
    from mrcnn_tf.model import build_model
    from mrcnn_tf.serving import export_saved_model, next_version, serving_options

    overrides = list(args.set)
    image_size = None
    if args.format == "litert":
        try:
            image_size = tuple(int(v) for v in (args.image_size or "").split(","))
            if len(image_size) != 2 or min(image_size) < 1:
                raise ValueError
        except ValueError:
            p.error("--format litert needs --image_size H,W (two positive integers), e.g. "
                    "--image_size 480,640")
    if args.format != "saved_model":
        if args.mask_output is None:
            overrides.append("export.mask_output=box")
    if args.max_detections is not None:
        overrides.append(f"export.max_detections={args.max_detections}")
    if args.mask_output is not None:
        overrides.append(f"export.mask_output={args.mask_output}")
    if args.max_image_pixels is not None:
        overrides.append(f"export.max_image_pixels={args.max_image_pixels}")
    if args.input_type is not None:
        types = [t.strip() for t in args.input_type.split(",") if t.strip()]
        overrides.append(f"export.input_types=[{', '.join(types)}]")
    try:
        if args.model_dir:
            from mrcnn_tf.rundir import read_run

            config, checkpoint, ids, names = read_run(args.model_dir, overrides)
        else:
            if not args.config:
                p.error("--checkpoint needs --config")
            from mrcnn_tf.config import packaged_config

            config = load_config(packaged_config(args.config), overrides)
            checkpoint = args.checkpoint
            from mrcnn_tf.data import source_info

            info = source_info(config, training=False)
            ids, names = info.category_ids, info.class_names
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format != "saved_model":
        # The implementations the converters take, with the same numbers (tests/ops). Not --set
        # overrides: a run directory's model section is fixed, and these change no number.
        from mrcnn_tf.export_formats import converter_config

        config = converter_config(config, args.format)
    options = serving_options(config)
    input_types = options["input_types"]
    model = build_model(config)
    restore(model, checkpoint)
    version = args.version if args.version is not None else next_version(args.output)
    export_dir = os.path.join(args.output, str(version))
    if os.path.exists(export_dir):
        print(f"error: {export_dir} exists; choose another --version", file=sys.stderr)
        return 2
    t0 = time.time()
    if args.format != "saved_model":
        from mrcnn_tf.export_formats import export_litert, export_onnx

        options.pop("input_types")
        options.pop("max_image_pixels")
        try:
            if args.format == "onnx":
                path = export_onnx(model, ids, names, os.path.join(export_dir, "model.onnx"),
                                   **options)
                what = "ONNX opset 17, images uint8 [B, H, W, 3]"
            else:
                path = export_litert(model, ids, names, os.path.join(export_dir, "model.tflite"),
                                     image_size, **options)
                what = f"LiteRT builtin ops, images uint8 [1, {image_size[0]}, {image_size[1]}, 3]"
        except (ValueError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"exported {checkpoint} to {path} ({what}; masks: {options['mask_output']}) in "
              f"{time.time() - t0:.1f} s")
        return 0
    try:
        export_saved_model(model, ids, names, export_dir, **options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} to {export_dir} ({', '.join(input_types)}; "
          f"serving_default = {input_types[0]}) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
