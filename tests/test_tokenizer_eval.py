"""`unitok.evaluate` on a tiny folder with a tiny random Inception."""
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
    ([], "give --images and/or --zeroshot-dir"),
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


def test_zero_shot_on_image_folder(tmp_path):
    """The CLI's accuracies equal an independent per-image computation (7 classes, so top-5 < 100 is
    possible): class weights = renormalised mean of the normalised template embeddings (open_clip's rule)."""
    import open_clip
    import torch.nn.functional as F
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from unitok import load_tokenizer
    from unitok.evaluate import load_val_image

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(tmp_path / "tok")
    classes = ["blue_square", "green_star", "orange_cross", "pink_ring", "purple_heart", "red_circle", "white_moon"]
    for i, cls in enumerate(classes):
        _folder(tmp_path / "zs" / cls, n=2, size=32, seed=i)
    main(["--tokenizer", str(tmp_path / "tok"), "--zeroshot-dir", str(tmp_path / "zs"), "--size", "32",
          "--out", str(tmp_path / "o"), "--batch-size", "3"])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["zeroshot_images"] == 14 and m["zeroshot_classes"] == 7

    model = load_tokenizer(tmp_path / "tok").eval()
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=model.cfg.text.context_length)
    with torch.no_grad():
        w = []
        for c in classes:
            e = model.encode_text(tok([t(c.replace("_", " ")) for t in OPENAI_IMAGENET_TEMPLATES]), normalize=True)
            w.append(F.normalize(e.mean(0), dim=0))
        w = torch.stack(w, 1)  # (D, 7)
        top1 = top5 = 0
        for label, cls in enumerate(classes):
            for path in sorted((tmp_path / "zs" / cls).iterdir()):
                s = (model.encode_image(load_val_image(path, 32)[None], normalize=True) @ w)[0]
                order = s.argsort(descending=True).tolist()
                top1 += order[0] == label
                top5 += label in order[:5]
    assert m["zeroshot_top1"] == pytest.approx(100 * top1 / 14) and m["zeroshot_top5"] == pytest.approx(100 * top5 / 14)


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
