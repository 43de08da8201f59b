"""`unitok.evaluate` on a tiny folder with a tiny random Inception; the linear probe on frozen features."""
import json
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from unitok import preset, UniTok
from unitok.evaluate import check_local_weights, codebook_stats, main, psnr_ssim


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A torch-fidelity InceptionV3 state dict with random weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inc") / "inception.pth"
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        for m in net.modules():  # variance-preserving init so random features do not vanish
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def _folder(root, n=6, size=40, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("argv,message", [
    ([], "give --images, --zeroshot-dir and/or --probe-dir"),
    (["--zeroshot-dir", "zs", "--inception-weights", "w.pth"], "--inception-weights does not apply without --images"),
    (["--images", "ref", "--classnames", "imagenet"], "--classnames does not apply without --zeroshot-dir"),
])
def test_flags_of_the_other_evaluation_are_errors(argv, message, capsys):
    from unitok.evaluate import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--tokenizer", "t", *argv])
    assert e.value.code == 2 and message in " ".join(capsys.readouterr().err.replace("│", "").split())
    cfg = parse_args(["--tokenizer", "t", "--images", "ref", "--inception-weights", "w", "--zeroshot-dir", "zs",
                      "--classnames", "imagenet", "--local_rank=0"])  # both together: every flag applies
    assert (cfg.inception_weights, cfg.classnames, cfg.size, cfg.local_rank) == ("w", "imagenet", 256, 0)


def test_reconstruction_metrics_and_fid(tmp_path, random_inception):
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    imgs = _folder(tmp_path / "imgs")
    main(["--tokenizer", str(tmp_path / "tok"), "--images", str(imgs), "--size", "32", "--out", str(tmp_path / "o"),
          "--inception-weights", str(random_inception)])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["num_images"] == 6 and len(list((tmp_path / "o" / "recon").glob("*.png"))) == 6
    assert 0 < m["psnr"] < 60 and -1 <= m["ssim"] <= 1
    assert len(m["codebook_usage_pct"]) == 4 and 0 < m["mean_usage_pct"] <= 100
    assert m["rfid"] >= 0 and m["is"] > 0


def test_inception_weights_of_another_layout_are_refused_by_name_and_shape(tmp_path, random_inception):
    """The check compares the file with torch-fidelity's own extractor (built without weights): another network's
    file (a DINOv2-like state dict), a missing tensor or another shape are refused, naming the file and the flag."""
    good = torch.load(random_inception, weights_only=True)
    assert check_local_weights(random_inception) == random_inception
    dino = {"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 14, 14)}
    short = {k: v for k, v in good.items() if k != "fc.weight"}
    reshaped = {**good, "fc.bias": torch.zeros(1000)}
    for name, state, message in (("dino.pth", dino, "unexpected (e.g. cls_token"),
                                 ("short.pth", short, "1 missing (e.g. fc.weight)"),
                                 ("reshaped.pth", reshaped, "1 with another shape (e.g. fc.bias (1000,) (expected "
                                                            "(1008,))")):
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match="not torch-fidelity's inception-v3-compat state dict") as err:
            check_local_weights(tmp_path / name)
        assert f"--inception-weights {tmp_path / name}" in str(err.value) and message in str(err.value), str(err.value)


@pytest.mark.parametrize("bad", ["missing", "wrong_layout"])
def test_bad_inception_weights_fail_before_the_reconstruction_pass(tmp_path, bad):
    """A mistyped or wrong --inception-weights stops the run before the tokenizer loads: no PNG is written and no
    reconstruction time is spent on a run that cannot write its metrics."""
    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    weights = tmp_path / "inception.pth"
    if bad == "wrong_layout":
        torch.save({"cls_token": torch.zeros(1, 1, 8)}, weights)
    with mock.patch("unitok.loading.load_tokenizer", side_effect=AssertionError("the tokenizer was loaded")), \
            pytest.raises(FileNotFoundError if bad == "missing" else ValueError, match="--inception-weights"):
        main(["--tokenizer", str(tmp_path / "tok"), "--images", str(_folder(tmp_path / "imgs")), "--size", "32",
              "--out", str(tmp_path / "o"), "--inception-weights", str(weights)])
    assert not (tmp_path / "o").exists()


def test_rerun_into_the_same_out_scores_only_its_own_images(tmp_path):
    """torch-fidelity reads whole folders, so recon/ and reference/ are emptied first: a second run with fewer
    images leaves only its own PNGs, named by the image's index in the sorted folder on every rank."""
    from unitok import load_tokenizer
    from unitok.evaluate import evaluate_reconstruction, list_images, load_val_image, to_uint8

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    argv = ["--tokenizer", str(tmp_path / "tok"), "--size", "32", "--out", str(tmp_path / "o")]
    main([*argv, "--images", str(_folder(tmp_path / "six"))])
    two = _folder(tmp_path / "two", n=2, seed=1)
    main([*argv, "--images", str(two)])
    for sub in ("recon", "reference"):
        assert sorted(p.name for p in (tmp_path / "o" / sub).iterdir()) == ["000000.png", "000001.png"]
    ref = np.asarray(Image.open(tmp_path / "o" / "reference" / "000001.png"))
    assert np.array_equal(ref, to_uint8(load_val_image(two / "1.png", 32)))
    images = list_images(tmp_path / "six")
    evaluate_reconstruction(load_tokenizer(tmp_path / "tok"), images, 32, tmp_path / "r1", 2, rank=1, world=2)
    assert sorted(p.name for p in (tmp_path / "r1" / "recon").iterdir()) == ["000001.png", "000003.png", "000005.png"]


def test_val_images_are_read_like_training_reads_them(tmp_path):
    """Transparent pixels composite on white (unitok.image_io.load_image), not black as PIL's convert("RGB")."""
    from unitok.evaluate import load_val_image

    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[:, 24:] = (0, 0, 0, 255)  # right half opaque black, left half transparent (black underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = load_val_image(tmp_path / "rgba.png", 32)  # 48x40 -> 38x32, centre crop from x = 3
    assert torch.equal(x[:, :, :10], torch.ones(3, 32, 10)) and torch.equal(x[:, :, 24:], -torch.ones(3, 32, 8))


def test_zero_shot_on_image_folder(tmp_path, capsys):
    """The CLI's accuracies equal an independent per-image computation (7 classes, so top-5 < 100 is
    possible): class weights = renormalised mean of the normalised template embeddings (open_clip's rule),
    with OpenAI's ImageNet templates by default and with the lines of a --templates file."""
    import open_clip
    import torch.nn.functional as F
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from unitok import load_tokenizer
    from unitok.evaluate import load_val_image, parse_args

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    classes = ["blue_square", "green_star", "orange_cross", "pink_ring", "purple_heart", "red_circle", "white_moon"]
    for i, cls in enumerate(classes):
        _folder(tmp_path / "zs" / cls, n=2, size=32, seed=i)
    model = load_tokenizer(tmp_path / "tok").eval()
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=model.cfg.text.context_length)

    @torch.no_grad()
    def independent(templates):
        w = []
        for c in classes:
            e = model.encode_text(tok([t(c.replace("_", " ")) for t in templates]), normalize=True)
            w.append(F.normalize(e.mean(0), dim=0))
        w = torch.stack(w, 1)  # (D, 7)
        top1 = top5 = 0
        for label, cls in enumerate(classes):
            for path in sorted((tmp_path / "zs" / cls).iterdir()):
                s = (model.encode_image(load_val_image(path, 32)[None], normalize=True) @ w)[0]
                order = s.argsort(descending=True).tolist()
                top1 += order[0] == label
                top5 += label in order[:5]
        return 100 * top1 / 14, 100 * top5 / 14

    custom = ["a drawing of a {} on white", "{}, small", "the {} in the middle"]
    (tmp_path / "templates.txt").write_text("\n".join(custom) + "\n\n")  # blank lines are skipped
    for name, extra, templates in (("o", [], OPENAI_IMAGENET_TEMPLATES),
                                   ("o2", ["--templates", str(tmp_path / "templates.txt")],
                                    [lambda c, t=t: t.format(c) for t in custom])):
        from open_clip import zero_shot_classifier as zsc

        with mock.patch.object(zsc, "build_zero_shot_classifier", wraps=zsc.build_zero_shot_classifier) as built:
            main(["--tokenizer", str(tmp_path / "tok"), "--zeroshot-dir", str(tmp_path / "zs"), "--size", "32",
                  "--out", str(tmp_path / name), "--batch-size", "3", *extra])
        used = built.call_args.args[3]  # the templates the classifier was built from
        assert [t("X") if callable(t) else t.format("X") for t in used] == [t("X") for t in templates]
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["zeroshot_images"] == 14 and m["zeroshot_classes"] == 7
        top1, top5 = independent(templates)
        assert m["zeroshot_top1"] == pytest.approx(top1) and m["zeroshot_top5"] == pytest.approx(top5)

    # a templates file without exactly one {} per line, or a missing one, is refused before the model loads
    (tmp_path / "bad.txt").write_text("a photo of a {}\na photo\n")
    for spec, msg in ((tmp_path / "bad.txt", "exactly one '{}' for the class name; bad: 'a photo'"),
                      (tmp_path / "nope.txt", "no such file")):
        with pytest.raises(SystemExit) as e:
            parse_args(["--tokenizer", "t", "--zeroshot-dir", "zs", "--templates", str(spec)])
        assert e.value.code == 2 and msg in " ".join(capsys.readouterr().err.replace("│", "").split())


class NotATensor:
    """An arbitrary class that a weights_only load must refuse."""


def test_metric_helpers(tmp_path):
    a = np.zeros((8, 8, 3), np.uint8)
    assert psnr_ssim(a, a) == (100.0, 1.0)
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr_ssim(a, b)[0] == pytest.approx(10 * np.log10(255 ** 2 / (255 ** 2 / 192)), rel=1e-6)
    s = codebook_stats(torch.tensor([[5.0, 5.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    assert s["usage_pct"] == [50.0, 100.0]
    assert s["perplexity"] == pytest.approx([2.0, 4.0])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        check_local_weights(tmp_path / "nope.pth")

    torch.save({"x": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing"):
        check_local_weights(tmp_path / "evil.pth")


def test_probe_split_alternates_within_each_class():
    from unitok.evaluate import probe_split

    train, test = probe_split([0, 0, 0, 1, 1, 0, 2])  # class 0 at 0, 1, 2, 5; class 1 at 3, 4; class 2 at 6
    assert (train, test) == ([0, 2, 3, 6], [1, 4, 5])


def test_linear_probe_fits_separable_features_and_not_random_labels():
    """Gaussian clusters (5 classes, 16-d, L2-normalised like encode_image) are learned; labels that carry no
    information about the features are not (chance is 20 %)."""
    import torch.nn.functional as F

    from unitok.evaluate import linear_probe_top1, probe_split

    g = torch.Generator().manual_seed(0)
    C, per, D = 5, 20, 16
    y = torch.arange(C).repeat_interleave(per)
    centres = torch.randn(C, D, generator=g)
    x = F.normalize(centres[y] + 0.3 * torch.randn(C * per, D, generator=g), dim=1)
    tr, te = probe_split(y.tolist())
    assert linear_probe_top1(x[tr], y[tr], x[te], y[te], C) >= 95.0
    noise = F.normalize(torch.randn(C * per, D, generator=g), dim=1)
    assert linear_probe_top1(noise[tr], y[tr], noise[te], y[te], C) <= 45.0


def _colour_folder(root, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    for name, rgb in [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))]:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def _main_metrics(tmp_path, argv, name):
    main(["--tokenizer", str(tmp_path / "tok"), "--size", "32", "--out", str(tmp_path / name), *argv])
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_linear_probe_on_image_folder(tmp_path):
    """The CLI's probe equals an independent pass (per-image encode_image, the split rule, the fit); colour
    classes are separable even for a random tokenizer, so it is far above chance (33 %); ranks' shares of
    the features add up to the whole."""
    from unitok import load_tokenizer
    from unitok.evaluate import image_features, linear_probe_top1, load_val_image, probe_split

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    folder = _colour_folder(tmp_path / "probe")
    main(["--tokenizer", str(tmp_path / "tok"), "--probe-dir", str(folder), "--size", "32",
          "--out", str(tmp_path / "o"), "--batch-size", "5"])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (m["probe_classes"], m["probe_train_images"], m["probe_test_images"]) == (3, 6, 6)
    assert m["probe_top1"] >= 90.0

    model = load_tokenizer(tmp_path / "tok").eval()
    paths = [p for c in ("blue", "green", "red") for p in sorted((folder / c).iterdir())]  # ImageFolder's order
    y = torch.arange(3).repeat_interleave(4)
    with torch.no_grad():
        x = torch.cat([model.encode_image(load_val_image(p, 32)[None], normalize=True) for p in paths])
    tr, te = probe_split(y.tolist())
    assert m["probe_top1"] == pytest.approx(linear_probe_top1(x[tr], y[tr], x[te], y[te], 3))
    shares = [image_features(model, paths, 32, batch_size=2, rank=r, world=2) for r in (0, 1)]
    assert torch.allclose(shares[0] + shares[1], x, atol=1e-5) and not shares[0][1::2].any()

    # with the zero-shot folder as probe folder one encoding pass feeds both; the numbers do not change
    both = _main_metrics(tmp_path, ["--zeroshot-dir", str(folder), "--probe-dir", str(folder)], "both")
    alone = _main_metrics(tmp_path, ["--zeroshot-dir", str(folder)], "zs")
    assert both["probe_top1"] == m["probe_top1"] and both["zeroshot_top1"] == alone["zeroshot_top1"]
    assert both["zeroshot_top5"] == alone["zeroshot_top5"]

    for p in (folder / "red").iterdir():
        if p.name != "0.png":
            p.unlink()
    with pytest.raises(ValueError, match="class 'red' has 1 image"):
        main(["--tokenizer", str(tmp_path / "tok"), "--probe-dir", str(folder), "--size", "32",
              "--out", str(tmp_path / "o2")])
