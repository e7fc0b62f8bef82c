"""Token ids from llama.cpp's own tokenizer (through llama-cpp-python, which builds it from
source) for a set of texts: the independent reference our GGUF tokenizer import is checked
against (tests/smollm2.rs).

    python -m venv /tmp/ref && /tmp/ref/bin/pip install llama-cpp-python
    /tmp/ref/bin/python scripts/reference/llama_cpp_tokens.py FILE.gguf \
        --out model/tests/fixtures/smollm2-tokens.json
"""
import argparse
import json

from llama_cpp import Llama

TEXTS = [
    "The capital of France is",
    "Hello world! 123 4567 89.5%",
    "I can't, won't, shouldn't've; they're we'll I'd",
    "  leading spaces, trailing   \n\nnew lines\ttabs\r\n",
    "naïve café résumé — “quotes” and ‘single’ … 日本語のテキスト 😀👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # square\n",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "1234567890 3.14159 -42 1e-5 0x1F",
    "<|endoftext|>end of text marker and <repo_name> markers",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    llm = Llama(model_path=a.gguf, vocab_only=True, verbose=False)
    cases = []
    for t in TEXTS:
        ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
        cases.append({"text": t, "ids": ids})
    out = {"generator": "scripts/reference/llama_cpp_tokens.py (llama.cpp's tokenizer via llama-cpp-python)", "cases": cases}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    for c in cases:
        print(len(c["ids"]), c["ids"][:12])


if __name__ == "__main__":
    main()
