"""llama.cpp (through llama-cpp-python, built from source by pip) timed like
model/benches/llm.rs: prefill one 512-token prompt, decode 128 greedy tokens after a 6- and
a 512-token prompt, medians of REPS repetitions as one JSON line (scripts/bench/peers.sh).

    python llama_cpp_bench.py FILE.gguf LABEL REPS [THREADS]
    python llama_cpp_bench.py --requantize IN.gguf OUT.gguf f32|f16
"""
import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np


def requantize(src, dst, kind):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"f32": 0, "f16": 1}[kind]  # LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    assert rc == 0, rc


def prompt(n, vocab):
    return [(i * 7919 + 17) % (vocab - 100) + 100 for i in range(n)]


def main():
    if sys.argv[1] == "--requantize":
        requantize(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    path, label, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def argmax():
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(vocab,))))

    def prefill(ids):
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        llm.eval(ids)
        argmax()
        return time.perf_counter() - t

    def decode(ids, new):
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(ids)
        nxt = argmax()
        t = time.perf_counter()
        for _ in range(new):
            llm.eval([nxt])
            nxt = argmax()
        return time.perf_counter() - t

    short, long = prompt(6, vocab), prompt(512, vocab)
    prefill(short)
    rows = [(prefill(long), decode(short, 128), decode(long, 128)) for _ in range(reps)]
    med = lambda c: float(np.median([r[c] for r in rows]))
    print(json.dumps({"impl": "llama.cpp " + llama_cpp.__version__, "weights": label,
                      "prefill_tps": 512 / med(0), "decode6_tps": 128 / med(1), "decode512_tps": 128 / med(2)}))


if __name__ == "__main__":
    main()
