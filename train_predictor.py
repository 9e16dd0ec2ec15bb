"""Train the learned expert predictor on router traces and evaluate it against every baseline.

python train_predictor.py --traces DIR [--out DIR] [--config configs/predictor/default.yaml]
    [--model DIR] [--test-traces DIR] [--max-steps N] [--batch-size N] [--data-parallel N]
python train_predictor.py predict --predictor OUT/predictor --traces DIR [--model DIR] [--out FILE]
    [--dtype float32|float16]   (its probabilities for every trace row, for the simulator to replay)
"""

from __future__ import annotations

import argparse
import json
import sys

from predictor.checkpoint import PredictorError
from predictor.data import PredictorDataError
from predictor.train import load_config, train


def predict_main(argv) -> None:
    """`predict`: store a trained predictor's probabilities for a trace set (moecxl.sim.stored)."""
    from moecxl.sim.stored import StoredPredictionsError
    from moecxl.traces import TraceError
    from predictor.predictions import predict_traces

    ap = argparse.ArgumentParser(prog="train_predictor.py predict", description=predict_main.__doc__)
    ap.add_argument(
        "--predictor", required=True, help="exported predictor (train_predictor.py's OUT/predictor)"
    )
    ap.add_argument("--traces", required=True, help="trace directory to predict every row of")
    ap.add_argument(
        "--model", default=None, help="the traced model, for pre-gate features (default: metadata)"
    )
    ap.add_argument("--out", default=None, help="default: TRACES/predictions/learned.safetensors")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args(argv)
    try:
        path = predict_traces(args.predictor, args.traces, model=args.model, out=args.out, dtype=args.dtype)
    except (PredictorError, PredictorDataError, StoredPredictionsError, TraceError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"predictions": str(path), "bytes": path.stat().st_size}))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        return predict_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", required=True, help="trace directory (python -m moecxl.traces collect)")
    ap.add_argument("--out", default=None, help="output directory (default: runs/predictor/<traces name>)")
    ap.add_argument("--config", default=None, help="YAML of TrainConfig fields")
    ap.add_argument(
        "--model", default=None, help="the traced model, for pre-gate features (default: metadata)"
    )
    ap.add_argument("--test-traces", default=None, help="evaluate on these traces instead of the test split")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="training windows per step")
    ap.add_argument(
        "--data-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each training batch over N devices, gradients of the whole batch (0: all devices; "
        "CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from pathlib import Path

    out = args.out or str(Path("runs/predictor") / Path(args.traces).name)
    try:
        cfg = load_config(args.config, max_steps=args.max_steps, batch_size=args.batch_size)
        report = train(
            args.traces,
            out,
            cfg,
            model=args.model,
            test_traces=args.test_traces,
            progress=not args.no_progress,
            data_parallel=args.data_parallel,
        )
    except (PredictorError, PredictorDataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"out": out, "summary": report["summary"], "cost": report["cost"]}, indent=1))


if __name__ == "__main__":
    main()
