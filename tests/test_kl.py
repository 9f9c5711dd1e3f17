"""The KL report's math and files: KL(reference || peer) checked against torch's own kl_div on
random logits, the pooled statistics against the per-position numbers, and the report read from
golden directories and .npz files. (llama.cpp's KL numbers are in test_llama_cpp.py.)"""

import numpy as np
import pytest
import torch

from minigemma import golden, kl


def random_logits(seed, T=7, V=300, scale=3.0):
    return np.random.default_rng(seed).normal(0, scale, (T, V)).astype(np.float32)


def torch_kl(reference, peer):
    """KL(reference || peer) per row by torch: kl_div(input=log q, target=log p, log_target)
    sums p (log p - log q)."""
    log_p = torch.log_softmax(torch.tensor(reference, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.tensor(peer, dtype=torch.float64), -1)
    kl = torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True)
    return kl.sum(-1).numpy()


@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])  # flat, typical, and nearly one-hot rows
def test_kl_matches_torch_kl_div(scale):
    reference, peer = random_logits(0, scale=scale), random_logits(1, scale=scale)
    ours = kl.kl_divergence(reference, peer)
    assert ours.shape == (7,) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, torch_kl(reference, peer), rtol=1e-12, atol=1e-15)


def test_kl_is_zero_for_the_same_distribution_and_not_symmetric():
    reference, peer = random_logits(2), random_logits(3)
    assert np.all(kl.kl_divergence(reference, reference + 5.0) <= 1e-12)  # softmax ignores shifts
    forward, backward = kl.kl_divergence(reference, peer), kl.kl_divergence(peer, reference)
    np.testing.assert_allclose(backward, torch_kl(peer, reference), rtol=1e-12)
    assert not np.allclose(forward, backward)


def test_table_statistics_per_prompt_and_pooled():
    """Two prompts; the peer swaps the top-2 logits at known positions and is otherwise a small
    perturbation, so top-1 agreement and max |dlogit| are known exactly."""
    rng = np.random.default_rng(4)
    reference = {"a": random_logits(5, T=10), "b": random_logits(6, T=30)}
    peer = {}
    for name, ref in reference.items():
        noise = rng.normal(0, 0.01, ref.shape).astype(np.float32)
        peer[name] = ref + noise
    rows = np.arange(30)[::3]   # 10 of b's 30 positions get their top-2 swapped
    top2 = np.argsort(-reference["b"][rows], axis=-1)[:, :2]
    first = np.take_along_axis(reference["b"][rows], top2[:, :1], -1)
    second = np.take_along_axis(reference["b"][rows], top2[:, 1:], -1)
    swapped = peer["b"][rows]
    np.put_along_axis(swapped, top2[:, :1], second - 1.0, -1)
    np.put_along_axis(swapped, top2[:, 1:], first + 1.0, -1)
    peer["b"][rows] = swapped

    table = kl.compare(reference, peer)
    by_name = dict(table.rows)
    for name in ("a", "b"):
        expected = torch_kl(reference[name], peer[name])
        stats = by_name[name]
        assert stats.positions == len(expected)
        np.testing.assert_allclose(stats.mean, expected.mean(), rtol=1e-10)
        np.testing.assert_allclose(stats.max, expected.max(), rtol=1e-10)
        assert np.sort(expected)[-2] <= stats.p99 <= expected.max()
        assert stats.max_dlogit == pytest.approx(np.abs(peer[name].astype(np.float64)
                                                        - reference[name]).max())
    assert by_name["a"].top1 == 1.0 and by_name["b"].top1 == pytest.approx(20 / 30)
    pooled = np.concatenate([torch_kl(reference[n], peer[n]) for n in ("a", "b")])
    assert table.overall.positions == 40
    np.testing.assert_allclose(table.overall.mean, pooled.mean(), rtol=1e-10)
    np.testing.assert_allclose(table.overall.p99, np.percentile(pooled, 99), rtol=1e-10)
    assert table.overall.top1 == pytest.approx(30 / 40)
    assert table.overall.max_dlogit == max(s.max_dlogit for s in by_name.values())
    assert table.left_out == []
    in_blocks = kl.position_stats(reference["b"], peer["b"], rows=4)  # 30 rows: 7 blocks + 2
    np.testing.assert_array_equal(in_blocks[0], kl.kl_divergence(reference["b"], peer["b"]))
    assert in_blocks[1].sum() == 20 and in_blocks[2] == by_name["b"].max_dlogit


def test_bad_input_is_named():
    ref = {"a": random_logits(0), "b": random_logits(1)}
    with pytest.raises(ValueError, match="prompt 'a'.*shape"):
        kl.compare(ref, {"a": random_logits(0, T=6)})
    with pytest.raises(ValueError, match="no prompt has logits on both sides"):
        kl.compare(ref, {"c": random_logits(0)})
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        kl.read_logits("/nonexistent/nowhere.npz")


# ----------------------------------------------------------------------------------------------
# Files and the printed report


PROMPTS = [{"name": "short", "ids": [2, 17, 300, 41, 9]}, {"name": "one", "ids": [2]},
           {"name": "long", "ids": [2] + list(range(3, 40))}]


@pytest.fixture(scope="module")
def recorded(tiny_checkpoints, tmp_path_factory):
    """A golden of a tiny checkpoint; "long" (38 tokens) is stored in the top-k form."""
    out = str(tmp_path_factory.mktemp("kl") / "G")
    golden.record(tiny_checkpoints["mqa", "f32"], PROMPTS, out, new_tokens=4,
                  full_logits_max_tokens=16, top_k=8)
    return out


def test_report_from_a_golden_and_an_npz(recorded, tmp_path, capsys):
    reference = kl.read_logits(recorded)
    assert sorted(reference) == ["one", "short"]  # "long" has no full logits in the golden
    assert kl.read_greedy(recorded)["short"].shape == (4,)
    peer = {name: logits + np.float32(0.05) * random_logits(9, *logits.shape, scale=1.0)
            for name, logits in reference.items()}
    peer["long"] = random_logits(0, T=38, V=512)
    path = str(tmp_path / "peer.npz")
    np.savez(path, **{f"{name}/logits": value for name, value in peer.items()})

    assert kl.main([path, "--against", f"same weights={recorded}", "--against", recorded]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == f"KL divergence of {path}"
    assert lines[1].split()[:3] == ["prompt", "against", "positions"]
    table = kl.compare(reference, kl.read_logits(path))
    assert [name for name, _ in table.rows] == ["short", "one"] and table.left_out == ["long"]
    row = next(line for line in lines if line.startswith("short"))
    assert row.split()[1:4] == ["same", "weights", "5"]
    assert f"{table.rows[0][1].mean:.3g}" in row
    assert any(line.split()[:1] == ["G"] for line in lines)  # the unlabelled reference: its name
    assert [line.split()[:2] for line in lines if line.startswith("all")] == [["all", "same"]]
    assert "not compared against same weights: long" in printed


def test_cli_rejects_a_reference_without_a_path(capsys):
    with pytest.raises(SystemExit):
        kl.main(["peer.npz", "--against", "label="])
    assert "expected LABEL=PATH" in capsys.readouterr().err


def test_summary_names_each_peer_once():
    reference = {"a": random_logits(0)}
    reports = {kind: kl.report({"a": reference["a"] + noise * random_logits(1, scale=1.0)},
                               {"same": reference, "original": reference})
               for kind, noise in (("Q8_0", 0.01), ("Q4_0", 0.1))}
    lines = kl.summary(reports, title="T").splitlines()
    assert lines[0] == "T" and lines[1].split()[:2] == ["peer", "against"]
    assert [line.split()[:2] for line in lines[3:7]] == [["Q8_0", "same"], ["original", "7"],
                                                         ["Q4_0", "same"], ["original", "7"]]
    q8, q4 = (reports[k].tables["same"].overall.mean for k in ("Q8_0", "Q4_0"))
    assert f"{q8:.3g}" in lines[3] and f"{q4:.3g}" in lines[5] and q8 < q4
