"""Time openTSNE against scikit-learn's t-SNE on real CIFAR-10 features, and compare what they produce.

    python -m benchmarks.bench_tsne --run runs/CIFAR10Net_7 --data-dir ./data

Takes a trained network's penultimate features as tsne.py does, then embeds the 10,000 test points
with openTSNE and with scikit-learn (the original's implementation, 62 s on 2 cores), and the 45,000
training points with openTSNE. For each it prints the seconds the t-SNE took against its target on
a 2-core machine, the silhouette score by true class in the 2-D embedding (quality: higher is better
separated) and the 5-NN accuracy in the feature space (a property of the features, so the same for
both methods on one split: a check that they embedded the same points).
"""

from __future__ import annotations

import argparse
import os
import time

import engine
import tsne
from analyses import embedding as tsne_embedding

# (split, method, target seconds on 2 cores; None: the reference, no target)
CASES = (("test", "opentsne", 60), ("test", "sklearn", None), ("train", "opentsne", 240))


def versions() -> str:
    import openTSNE
    import sklearn

    return (
        f"{os.cpu_count()} CPU cores, t-SNE n_jobs {tsne_embedding.N_JOBS}, openTSNE {openTSNE.__version__}, "
        f"scikit-learn {sklearn.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tsne.add_model_arguments(parser)
    args = parser.parse_args()
    device = engine.training_device(args.device)
    saved = tsne.open_model(args)
    data = tsne.model_data(saved, args)
    net = saved.net.to(device)
    print(versions())

    started = time.perf_counter()
    predicted = {split: tsne.split_predictions(net, data, split) for split in tsne.SPLITS}
    print(
        f"Features of {saved.name}: {sum(len(p['labels']) for p in predicted.values()):,} images on {device} "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )

    for split, method, target in CASES:
        _, report = tsne_embedding.embed_and_score(
            predicted[split]["features"].numpy(), predicted[split]["labels"].numpy(), method, args.seed
        )
        verdict = (
            ""
            if target is None
            else f" [target <= {target} s: {'met' if report['tsne_seconds'] <= target else 'MISSED'}]"
        )
        print(tsne_embedding.describe(split, report) + verdict, flush=True)


if __name__ == "__main__":
    engine.run_cli(main)
