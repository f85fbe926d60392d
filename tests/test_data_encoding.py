"How the images of a CIFAR folder were encoded (issue 12's reading of the shared copy): experiments/data_encoding.py."
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

from conftest import make_cifar

sys.path.insert(0, str(Path(__file__).parents[1] / 'experiments'))
import data_encoding  # noqa: E402


def test_each_jpeg_is_counted_under_the_quality_and_subsampling_it_was_saved_with(tmp_path, monkeypatch):
    root = make_cifar(tmp_path / 'cifar', n_train=2, n_test=1)
    for png in sorted(root.glob('train/*/*.png')):
        quality, subsampling = (60, 0) if png.stem == '0000' else (90, 2)
        Image.open(png).save(png.with_suffix('.jpg'), quality=quality, subsampling=subsampling)
        png.unlink()
    out = tmp_path / 'encoding.csv'
    monkeypatch.setattr(sys, 'argv', ['data_encoding.py', '--data', str(root), '--out', str(out)])
    data_encoding.main()
    rows = {(r.split, r.format, r.quality, r.subsampling): r.images
            for r in pd.read_csv(out, dtype={'quality': str}, keep_default_na=False).itertuples()}
    assert rows == {('train', 'JPEG', '60', '4:4:4'): 3, ('train', 'JPEG', '90', '4:2:0'): 3,
                    ('test', 'PNG', 'n/a', 'n/a'): 3}
