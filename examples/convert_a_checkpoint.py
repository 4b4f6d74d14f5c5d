"""Convert a trained DLRM checkpoint with the Python API, then serve and score it.

What a user does with their own ``model.pt`` (facebookresearch/dlrm ``--save-model`` layout or a
TorchRec state_dict), shown on generated Criteo-like data so it runs anywhere:

1. generate data and train a small baseline DLRM (skip this with your own checkpoint);
2. compress its largest tables to TT cores (default row layout, then the balanced one to compare);
3. load the compressed model and score the test set;
4. the size and AUC report that ``fpd-convert report`` prints.

    python examples/convert_a_checkpoint.py --dir /tmp/fpd-example --train-rows 100000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import fpd_convert
from fpd_convert.data import CriteoData, synth
from fpd_convert.reporting.report import format_report, report
from fpd_convert.training.metrics import evaluate
from fpd_convert.training.train import train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="fpd-example", help="Where to write the data and models.")
    p.add_argument("--train-rows", type=int, default=100_000)
    p.add_argument("--test-rows", type=int, default=20_000)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)

    # 1. data and a baseline (your own checkpoint replaces this step)
    train_data, test_data = folder / "train.npz", folder / "test.npz"
    synth(train_data, args.train_rows, seed=0)
    synth(test_data, args.test_rows, seed=2)
    baseline = folder / "baseline.pt"
    trained = train(train_data, baseline, force=True, progress=False)
    print(f"baseline: {baseline} ({trained['steps']} steps)")

    # 2. compress the 5 largest tables; the row layout defaults to a long first core that is no
    #    larger than the balanced TT (suffix_rows="auto"); "balanced" is the other choice
    outputs = {}
    for layout in ("auto", "balanced"):
        out = folder / f"compressed_{layout}.safetensors"
        summary = fpd_convert.compress(baseline, out, rank=args.rank, suffix_rows=layout, force=True,
                                       progress=False)
        outputs[layout] = out
        for t in summary.tables:
            print(f"{layout:8s} {t.name}: {t.rows:,} rows, row factors {t.row_factors}, ranks {t.ranks}, "
                  f"{t.bytes_before:,} -> {t.bytes_after:,} bytes, rel. error {t.relative_error:.3f}")

    # 3. the compressed model is an nn.Module in eval mode; its TT tables are TTEmbeddingBag layers
    model = fpd_convert.load(outputs["auto"])
    tt_tables = [m for m in model.modules() if isinstance(m, fpd_convert.TTEmbeddingBag)]
    print(f"loaded {type(model).__name__} with {len(tt_tables)} TT tables")
    test = CriteoData(test_data, [m.num_embeddings for m in model.emb_l], 8192)  # ids checked against the tables
    scored = evaluate(model, test)
    print(f"test AUC of the compressed model: {scored['auc']:.4f} ({scored['n']:,} samples)")

    # 4. the report: bytes and AUC of the original against the compressed model
    print(format_report(report(baseline, outputs["auto"], data=test_data)))


if __name__ == "__main__":
    main()
