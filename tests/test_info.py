"""`finegrain info` against the CBAM paper's ResNet-50 figures (Woo et al. 2018, Table 1)."""

from __future__ import annotations

import re

import pytest

from finegrain.cli import main
from finegrain.training import CONFIGS

# attention -> (parameters in millions, GFLOPs) as the paper reports them at 224 px with 1000 classes
RECIPE = CONFIGS / "baseline_cub.yaml"
PAPER = {"none": (25.56, 3.858), "se": (28.09, 3.860), "cbam": (28.09, 3.864)}


@pytest.mark.parametrize("attention", sorted(PAPER))
def test_info_matches_the_paper_for_resnet50(attention, capsys):
    args = ["info", "--config", str(RECIPE), "--model.network.init_args.attention", attention,
            "--data.img_size", "224", "--num_classes", "1000"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    params = float(re.search(r"parameters\s+([\d.]+) M", out).group(1))
    gflops = float(re.search(r"GFLOPs\s+([\d.]+)", out).group(1))
    paper_params, paper_gflops = PAPER[attention]
    assert params == pytest.approx(paper_params, rel=0.01)
    # timm's ResNet-50 strides in the 3x3 conv (ResNet v1.5), which costs 0.231 GMACs more than the paper's v1
    assert gflops - paper_gflops == pytest.approx(0.231, abs=0.003)
    assert "input size  224x224" in out


@pytest.mark.parametrize(
    ("recipe", "classes"), [("lite0_cub10.yaml", 10), ("demo.yaml", 10), ("baseline_cub.yaml", 200)]
)
def test_info_counts_the_classes_the_recipe_trains(recipe, classes, capsys):
    assert main(["info", "--config", str(RECIPE.parent / recipe)]) == 0
    assert f", {classes} classes" in capsys.readouterr().out


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = re.search(r"\{([a-z,]+)\}", capsys.readouterr().out).group(1).split(",")
    assert set(listed) == {"fit", "validate", "test", "info", "data", "predict", "serve", "export", "bench"}
