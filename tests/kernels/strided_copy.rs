//! The vendored candle-core's copies shared among threads (LEASH-PATCH.md, fifth change):
//! each copy path above the size where it goes parallel, against indices computed by hand.

use candle_core::{Device, Tensor};

/// 0, 1, 2, ... as f32, in the given shape (exact for these sizes).
fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::arange(0u32, n as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .reshape(shape)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// (b, t, h, d) → (b, h, t, d), as attention's heads are split: runs of d elements.
#[test]
fn transposed_heads_copy_by_runs() {
    let (b, t, h, d) = (3, 70, 5, 64); // 67,200 elements, a ragged last task
    let x = iota(&[b, t, h, d]);
    let got = values(&x.transpose(1, 2).unwrap().contiguous().unwrap());
    let mut want = Vec::with_capacity(b * t * h * d);
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..d {
                    want.push((((bi * t + ti) * h + hi) * d + di) as f32);
                }
            }
        }
    }
    assert_eq!(got, want);
}

/// A column slice of a wide matrix (rows with a stride), and a concatenation along columns
/// (rows written with a stride); a plain copy of a contiguous tensor.
#[test]
fn strided_rows_and_whole_copies() {
    let (r, c) = (300, 400);
    let x = iota(&[r, c]);
    let got = values(&x.narrow(1, 7, 250).unwrap().contiguous().unwrap());
    let want: Vec<f32> = (0..r)
        .flat_map(|i| (7..257).map(move |j| (i * c + j) as f32))
        .collect();
    assert_eq!(got, want);

    let y = (iota(&[r, 200]) * -1.0).unwrap();
    let cat = values(&Tensor::cat(&[&x, &y], 1).unwrap());
    let want: Vec<f32> = (0..r)
        .flat_map(|i| {
            (0..c)
                .map(move |j| (i * c + j) as f32)
                .chain((0..200).map(move |j| -((i * 200 + j) as f32)))
        })
        .collect();
    assert_eq!(cat, want);

    let copied = values(&x.copy().unwrap());
    assert_eq!(copied, (0..r * c).map(|i| i as f32).collect::<Vec<_>>());
}
