"""Question: how were the shared CIFAR-10 images encoded? The copy here is a JPEG re-encoding of CIFAR-10, and a
32x32 image has few pixels to spare: at 4:2:0 chroma subsampling its colour is kept at 16x16. Each
file's JPEG quality is found by matching its quantization tables against the tables Pillow's encoder (libjpeg's
standard tables, scaled) writes at each quality 1-100; only the headers are read, no image is decoded.

Run: python experiments/data_encoding.py --data PATH --out experiments/results/data-encoding.csv
Writes one row per (split, format, quality, subsampling) with its number of images.
"""
import argparse
import io
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image, JpegImagePlugin

from cifar_fastai.data import cifar_files, locate_data

SUBSAMPLING = {-1: 'n/a', 0: '4:4:4', 1: '4:2:2', 2: '4:2:0'}  # Pillow's codes; -1: greyscale or CMYK JPEGs


def quality_by_tables():
    "Quantization tables -> the quality at which Pillow's encoder writes them (ties: the highest quality)."
    known = {}
    for quality in range(1, 101):
        buf = io.BytesIO()
        Image.new('RGB', (8, 8)).save(buf, 'JPEG', quality=quality)
        known[tables(Image.open(buf))] = quality
    return known


def tables(im): return tuple(tuple(im.quantization[k]) for k in sorted(im.quantization))


def describe(path, known):
    "(format, quality, subsampling) from the file's header."
    with Image.open(path) as im:
        if im.format != 'JPEG': return im.format, 'n/a', 'n/a'
        return 'JPEG', known.get(tables(im), 'non-standard tables'), SUBSAMPLING[JpegImagePlugin.get_sampling(im)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', required=True), ap.add_argument('--out', required=True)
    args = ap.parse_args()
    train, test, _ = cifar_files(locate_data(args.data))
    known = quality_by_tables()
    counts = Counter((split, *describe(f, known)) for split, files in (('train', train), ('test', test)) for f in files)
    df = pd.DataFrame([(*k, n) for k, n in sorted(counts.items(), key=str)],
                      columns=['split', 'format', 'quality', 'subsampling', 'images'])
    print(df.to_string(index=False))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)


if __name__ == '__main__': main()
