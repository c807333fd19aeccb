"""A GGUF file run the way a llama-cpp-python user runs it, with nothing of gptfn's.

``python -m tests.llama_probe FILE.gguf N TEXT`` prints JSON: llama.cpp's token ids for
TEXT, the text its detokenizer gives back, and N tokens from llama.cpp's own generation
loop after those ids (``Llama.generate`` with a greedy sampler: top-k 1).
"""

import json
import sys


def main(path: str, n: int, text: str) -> None:
    sys.modules["gptfn"] = None  # any import of gptfn now fails
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=0, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                              repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    print(json.dumps({"ids": ids, "text": llm.detokenize(ids).decode("utf-8"),
                      "generated": out, "n_vocab": llm.n_vocab()}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
