"""Write a tiny random-weight Llama (config + locally trained tokenizer) into DIR.

Nothing is downloaded: serve it with `--load-format dummy` (random weights) and
HF_HUB_OFFLINE=1. Used by the quickstart and the real-vLLM tests.
Usage: make_tiny_model.py DIR
"""
import json, os, random, sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

out = sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"
os.makedirs(out, exist_ok=True)
random.seed(0)
words = ["the", "cat", "dog", "sat", "on", "mat", "hello", "world", "ray", "cluster", "node", "server",
         "model", "token", "slurm", "job", "gpu", "cpu", "fast", "slow"]
corpus = [" ".join(random.choice(words) for _ in range(12)) for _ in range(2000)]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(corpus, trainer)
tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
tok.add_tokens([f"<x{i}>" for i in range(1024 - tok.get_vocab_size())])
tok.save(os.path.join(out, "tokenizer.json"))
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "model_max_length": 256, "add_bos_token": True, "clean_up_tokenization_spaces": False,
           # a plain chat template, so that /v1/chat/completions works too (batch tests mix both)
           "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"},
          open(os.path.join(out, "tokenizer_config.json"), "w"), indent=1)
json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
          open(os.path.join(out, "special_tokens_map.json"), "w"), indent=1)
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 1024,
       "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
       "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
json.dump({"bos_token_id": 1, "eos_token_id": 2}, open(os.path.join(out, "generation_config.json"), "w"))
print(f"tiny model in {out}")
