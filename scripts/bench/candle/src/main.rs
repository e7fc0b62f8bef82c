//! candle-transformers' LLaMA on an HF checkpoint directory: prefill one 512-token prompt,
//! decode 128 greedy tokens after a 6- and a 512-token prompt (KV cache), the medians of
//! `reps` repetitions as one JSON line. Usage: candle-llama-bench DIR f32|f16 REPS
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 17) % (vocab - 100) + 100) as u32).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let dtype = if args[2] == "f16" { DType::F16 } else { DType::F32 };
    let reps: usize = args[3].parse().unwrap();
    let device = Device::Cpu;
    let cfg: LlamaConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config = cfg.into_config(false);
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], dtype, &device).unwrap() };
    let model = Llama::load(vb, &config).unwrap();
    let vocab = config.vocab_size;
    let argmax = |logits: &Tensor| -> u32 { logits.to_dtype(DType::F32).unwrap().flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap() };
    let prefill = |ids: &[u32]| -> f64 {
        let mut cache = Cache::new(true, dtype, &config, &device).unwrap();
        let t = Instant::now();
        let input = Tensor::new(ids, &device).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&input, 0, &mut cache).unwrap();
        std::hint::black_box(argmax(&logits));
        t.elapsed().as_secs_f64()
    };
    let decode = |ids: &[u32], new: usize| -> f64 {
        let mut cache = Cache::new(true, dtype, &config, &device).unwrap();
        let input = Tensor::new(ids, &device).unwrap().unsqueeze(0).unwrap();
        let mut next = argmax(&model.forward(&input, 0, &mut cache).unwrap());
        let t = Instant::now();
        for i in 0..new {
            let input = Tensor::new(&[next], &device).unwrap().unsqueeze(0).unwrap();
            next = argmax(&model.forward(&input, ids.len() + i, &mut cache).unwrap());
        }
        t.elapsed().as_secs_f64()
    };
    let (short, long) = (prompt(6, vocab), prompt(512, vocab));
    let mut rows = Vec::new();
    prefill(&short);
    for _ in 0..reps {
        rows.push([prefill(&long), decode(&short, 128), decode(&long, 128)]);
    }
    let col = |c: usize| median(rows.iter().map(|r: &[f64; 3]| r[c]).collect());
    println!(
        "{}",
        serde_json::json!({"impl": "candle 0.9", "weights": args[2], "prefill_tps": 512.0 / col(0), "decode6_tps": 128.0 / col(1), "decode512_tps": 128.0 / col(2)})
    );
}
