"""Prompt adherence of a train.py run on more held-out captions and other seeds than its own
evaluation.json (200 captions, seeds 0..199): is a run's figure the model or the draw?

For each guidance scale: colour and shape accuracy over the first N test captions (held-out
combinations), whole-scene adherence (every described object, `shapes_eval.score_scenes`), shape
accuracy of small and large objects, and the shape confusion matrix (rows:
the prompt's shape, columns: what `jdiff.app.shapes_eval.detect` reads), with image i drawn from seed
`--seed + i`.

    python bench/adherence.py /work/runs/final --num-prompts 1000 --seed 100000
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jdiff import load_pipeline  # noqa: E402
from jdiff.app import shapes  # noqa: E402
from jdiff.app.shapes_tfds import load_shapes  # noqa: E402
from jdiff.app.shapes_eval import (described_scenes, detect, first_objects, generate_batched, match,  # noqa: E402
                                   score_scenes)


def adherence(images, labels) -> dict:
    """Colour and shape accuracy, shape accuracy per size, and the shape confusion matrix."""
    confusion = np.zeros((len(shapes.SHAPES),) * 2, int)
    colour_hits, size_hits, size_counts = 0, np.zeros(len(shapes.SIZES)), np.zeros(len(shapes.SIZES))
    for image, (shape, colour, size, position) in zip(images, labels):
        found = match(detect(image), position)
        read = found.shape if found else -1  # nothing found: counted wrong, in no column
        if read >= 0:
            confusion[shape, read] += 1
        colour_hits += bool(found) and found.colour == colour
        size_hits[size] += read == shape
        size_counts[size] += 1
    return dict(colour_accuracy=colour_hits / len(labels), shape_accuracy=float(np.trace(confusion)) / len(labels),
                **{f"shape_accuracy_{name}": float(size_hits[i] / max(size_counts[i], 1))
                   for i, name in enumerate(shapes.SIZES)},
                shape_confusion={"rows_prompt_columns_read": list(shapes.SHAPES), "counts": confusion.tolist()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="a train.py workdir (its pipeline/, data/ and config.json)")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=100_000)
    parser.add_argument("--guidances", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default=None, help="default: bench/results/adherence_<workdir name>.json")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    config = json.loads((workdir / "config.json").read_text())
    data, sample = config["data"], config["sample"]
    source = load_shapes(data["data_dir"] or workdir / "data", "test", resolution=data["resolution"],
                         num_train=data["num_train"], num_test=data["num_test"], seed=config["seed"])
    pipe = load_pipeline(workdir / "pipeline")
    captions, labels = first_objects(source, args.num_prompts)
    scenes = described_scenes(source, args.num_prompts)
    results = []
    for guidance in args.guidances:
        images = generate_batched(pipe, captions, guidance=guidance, sampler=sample["sampler"], steps=sample["steps"],
                                  batch_size=args.batch_size, seed=args.seed)
        result = dict(name=f"guidance_{guidance:g}", guidance=guidance, num_prompts=len(captions), seed=args.seed,
                      sampler=sample["sampler"], steps=sample["steps"], **adherence(images, labels),
                      whole_scene=score_scenes(images, scenes))
        print(json.dumps(result), flush=True)
        results.append(result)
    out = args.out or Path(__file__).parent / "results" / f"adherence_{workdir.name}.json"
    write_report(out, results, diffusion_steps=config["diffusion_train"]["steps"])


if __name__ == "__main__":
    main()
