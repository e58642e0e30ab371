"""A change of training code that changes the numbers must bump RECIPE_VERSION (DESIGN.md)."""
from __future__ import annotations

import os

import pytest

import kdlib.step
from kdlib.config import RECIPE_VERSION

import recipe_fingerprint as recipe

RECORD = "python tests/recipe_fingerprint.py --record"


@pytest.mark.slow
def test_this_code_computes_what_the_recipe_version_computed():
    """The tiny grid's numbers equal the ones stored for this recipe version on this machine."""
    known = recipe.stored().get(str(RECIPE_VERSION))
    if not known:
        pytest.fail(f"recipe {RECIPE_VERSION} has no fingerprint in {recipe.FINGERPRINTS.name}: "
                    f"after bumping RECIPE_VERSION, store this machine's with `{RECORD}`")
    here = recipe.machine()
    if here not in known:
        pytest.skip(f"no recipe-{RECIPE_VERSION} fingerprint for {here} (stored: "
                    f"{'; '.join(known)}); another processor computes other last bits: "
                    f"`{RECORD}` on a checkout whose numbers are known good")
    assert recipe.compute() == known[here], (
        f"this code trains other numbers than recipe {RECIPE_VERSION} did on {here}: if the "
        "change is meant to change them, bump kdlib.config.RECIPE_VERSION (records made by the "
        f"old code then get other run ids) and `{RECORD}`; if not, it changed them by mistake")


@pytest.mark.slow
def test_the_fingerprint_sees_a_change_in_the_last_bit_of_the_kd_loss(tmp_path, fake_data_root,
                                                                       monkeypatch):
    """The control: a KD run, then the same with its loss 2^-20 of itself off."""
    grid = (dict(chain=[32, 4], chain_methods=["progressive"], methods=["direct_kd"],
                 overrides={**recipe.TINY, "epochs": 1}),)
    before = recipe.fingerprint(fake_data_root, tmp_path / "a", grid)
    assert recipe.fingerprint(fake_data_root, tmp_path / "b", grid) == before  # deterministic
    exact = kdlib.step.kd_loss_terms

    def nudged(*args, **kwargs):
        loss, ce, kd = exact(*args, **kwargs)
        return loss * (1 + 2 ** -20), ce, kd

    monkeypatch.setattr(kdlib.step, "kd_loss_terms", nudged)
    monkeypatch.setenv("KDLIB_TENSORBOARD", "1")
    assert recipe.fingerprint(fake_data_root, tmp_path / "c", grid) != before
    assert os.environ["KDLIB_TENSORBOARD"] == "1"  # left as it was for the tests after it
