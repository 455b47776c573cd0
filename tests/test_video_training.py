"""The video main job end to end on CPU: a short training run on the synthetic videos learns to
segment and to track (STQ, AQ and VPQ well above the untrained model's)."""

import json
import subprocess
import sys

import pytest
from make_toy_video_dataset import generate_toy_video_dataset
from scripts import REPO, load_script


@pytest.mark.slow
def test_short_training_improves_stq_over_the_untrained_model(tmp_path):
    generate_toy_video_dataset()  # the default data set, in the tests' datasets folder
    demo = load_script("tools/run_demo.py")
    argv = ["--task", "video", "--max-iter", "80", "--num-vis", "2", "--output-dir", str(tmp_path)]
    assert demo.main(argv) == 0
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    trained = summary["results"]["video_panoptic_seg"]
    untrained = summary["untrained_results"]["video_panoptic_seg"]
    assert trained["STQ"] > untrained["STQ"] + 10
    assert trained["AQ"] > untrained["AQ"] + 5
    assert trained["VPQ"] > untrained["VPQ"] + 10
    assert len(list((tmp_path / "vis").glob("*.png"))) == 2  # frames drawn with track colours

    # the run's folder is its model: evaluating it again gives the same scores
    eval_dir = tmp_path / "eval"
    command = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(tmp_path)]
    command += ["--eval-only", "OUTPUT_DIR", str(eval_dir)]
    subprocess.run(command, check=True, capture_output=True)
    (results_file,) = eval_dir.glob("inference/*/video_panoptic_results.json")
    with open(results_file) as f:
        again = json.load(f)
    assert again["metrics"]["STQ"] == pytest.approx(trained["STQ"], abs=1e-9)
