//! One crop from a 16384² tiled store against decoding the whole image from
//! PNG: the paper's App. 7.4 claim (pyramid TIFF + VIPS: "milliseconds
//! instead of seconds"). `SACCADE_BENCH_SIZE` changes the image side.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use image::GrayImage;
use saccade::data::cluttered::{mnist_split, Mode, SceneConfig, SceneDataset, Task};
use saccade::data::mnist::{default_dir, Mnist};
use saccade::data::store::{write_tiled, TiledImage};
use saccade::data::{ImageSource, Split};
use saccade::ops::sampler::choose_level;

fn bench_crop(c: &mut Criterion) {
    let size: usize = std::env::var("SACCADE_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16384);
    let dir = tempfile::tempdir().expect("temp dir");
    let mnist = Mnist::load(&default_dir(), mnist_split(Split::Test)).expect("MNIST");
    let cfg = SceneConfig::large(Task::Pair, size, Mode::Native);
    let ds = SceneDataset::new(cfg, Split::Test, 0, 1, mnist.into(), 32, 0.0).expect("dataset");
    let src = ds.image(0).expect("image");

    let store = dir.path().join("image.tiles");
    let t = Instant::now();
    let bytes = write_tiled(&store, src.as_ref()).expect("store").bytes;
    eprintln!(
        "{size}² store: {:.1} MB written in {:.2?}",
        bytes as f64 / 1e6,
        t.elapsed()
    );

    let png = dir.path().join("image.png");
    let t = Instant::now();
    let mut raw = vec![0u8; size * size];
    let mut band = vec![0.0f32; 256 * size];
    for y0 in (0..size).step_by(256) {
        let n = 256.min(size - y0);
        src.read_region(0, y0 as i64, 0, n, size, &mut band[..n * size])
            .unwrap();
        for (o, v) in raw[y0 * size..(y0 + n) * size].iter_mut().zip(&band) {
            *o = (v * 255.0).round() as u8;
        }
    }
    GrayImage::from_raw(size as u32, size as u32, raw)
        .unwrap()
        .save(&png)
        .expect("png");
    let png_bytes = std::fs::metadata(&png).unwrap().len();
    eprintln!(
        "{size}² PNG: {:.1} MB written in {:.2?}",
        png_bytes as f64 / 1e6,
        t.elapsed()
    );

    // A crop 0.3 of the side wide (the paper's default), read with a one-pixel
    // margin at the level matching a 32×32 output, at a different place each time.
    const SCALE: f32 = 0.3;
    let extent = f64::from(SCALE) * size as f64;
    let mut k = 0u64;
    let mut out = Vec::new();
    let mut crop = |img: &TiledImage| {
        k += 1;
        let level = choose_level(img, SCALE, 32);
        let s = img.level_size(level).0 as f64 / size as f64;
        let side = (extent * s).ceil() as usize + 2;
        let (fy, fx) = ((k * 37 % 70) as f64 / 100.0, (k * 53 % 70) as f64 / 100.0);
        out.resize(side * side, 0.0);
        let (y0, x0) = (
            (fy * size as f64 * s) as i64 - 1,
            (fx * size as f64 * s) as i64 - 1,
        );
        img.read_region(level, y0, x0, side, side, &mut out).unwrap();
        black_box(&out);
    };

    let mut g = c.benchmark_group(format!("crop_{size}"));
    g.bench_function("store: open + one 0.3 crop at its level", |b| {
        b.iter(|| crop(&TiledImage::open(&store).unwrap()))
    });
    let opened = TiledImage::open(&store).unwrap();
    g.bench_function("store: one 0.3 crop, file open", |b| b.iter(|| crop(&opened)));
    let before = opened.bytes_read();
    crop(&opened);
    eprintln!("bytes read for one crop: {}", opened.bytes_read() - before);
    g.sample_size(10);
    g.bench_function("png: decode the whole image", |b| {
        b.iter(|| black_box(image::open(&png).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_crop);
criterion_main!(benches);
