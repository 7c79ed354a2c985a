"""The side-by-side benchmark's input checks (the timing itself needs the original's checkout and flax)."""

import pytest

from test_cli_sampling import load_script


def test_missing_checkout_says_what_to_pass(tmp_path):
    bench = load_script("bench_vs_original")
    with pytest.raises(SystemExit, match="diffusion_transformer.py.*kvfrans/jax-flow"):
        bench.main(["--original_dir", str(tmp_path)])


def test_missing_dependency_says_what_to_install(tmp_path):
    bench = load_script("bench_vs_original")
    (tmp_path / "diffusion_transformer.py").write_text("import rfdit_test_absent_module\n")
    with pytest.raises(SystemExit, match="rfdit_test_absent_module.*pip install flax einops ml_collections"):
        bench.main(["--original_dir", str(tmp_path)])
