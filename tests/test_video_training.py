"""The video main job end to end on CPU: a short training run on the synthetic videos learns to
segment and to track (STQ, AQ and VPQ well above the untrained model's)."""

import json

import pytest
from make_toy_video_dataset import generate_toy_video_dataset
from scripts import load_script


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
