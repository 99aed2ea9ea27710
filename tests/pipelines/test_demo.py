import json

import pytest

from pipelines.demo import DEMO_RUNS, SHIPPED_TEACHER, DemoConfig, run_demo
from teacher_service.checkpoint import load_teacher
from tests.pipelines.conftest import write_fashion_source

FASHION_MNIST_CLASSES = 10


def test_shipped_teacher_loads_with_card():
    model, spec = load_teacher(str(SHIPPED_TEACHER))

    assert spec.arch.startswith("vit_")
    assert spec.num_classes == FASHION_MNIST_CLASSES
    assert spec.class_names[0] == "T-shirt/top"
    assert spec.class_names[-1] == "Ankle boot"
    assert spec.img_size == (28, 28)
    assert spec.patch_size == (4, 4)
    assert spec.in_chans == 1
    assert len(spec.digest) == 64
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


@pytest.mark.slow
def test_demo_short_run_end_to_end(tmp_path, capsys):
    source = tmp_path / "source"
    write_fashion_source(source, num_train=64, num_test=32)
    config = DemoConfig(
        out=tmp_path / "demo",
        source=source,
        data=tmp_path / "shards",
        max_steps=2,
        batch_size=16,
    )

    results = run_demo(config)

    written = json.loads((config.out / "results.json").read_text())
    assert written == results
    assert 0.0 <= results["teacher_top1"] <= 1.0
    assert [run["name"] for run in results["runs"]] == [run.name for run in DEMO_RUNS]
    by_name = {run["name"]: run for run in results["runs"]}
    assert by_name["no_teacher"]["teacher_macs_per_image"] == 0
    assert by_name["full_kd"]["teacher_compute_saved"] == pytest.approx(0.0)
    masked = by_name["maskedkd_50"]
    assert 0.4 < masked["teacher_compute_saved"] < 0.6
    assert masked["teacher_macs_per_image"] < by_name["full_kd"]["teacher_macs_per_image"]
    # The KD runs asked the service: the MACs it reported match the analytic count.
    for name in ("full_kd", "maskedkd_50"):
        run = by_name[name]
        assert run["teacher_macs_spent"] > 0
        assert run["measured_macs_per_image"] == pytest.approx(run["teacher_macs_per_image"])
    assert by_name["no_teacher"]["teacher_macs_spent"] == 0
    for run in results["runs"]:
        assert 0.0 <= run["top1"] <= 1.0
        assert run["wall_s"] > 0
        assert (config.out / run["name"] / "metrics.jsonl").is_file()
    assert (config.out / "accuracy.png").stat().st_size > 0
    assert "maskedkd_50" in capsys.readouterr().out
