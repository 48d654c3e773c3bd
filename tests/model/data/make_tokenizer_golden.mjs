// Golden encodings from transformers.js (an independent tokenizer implementation).
import { AutoTokenizer, env } from '@huggingface/transformers';
import fs from 'fs';
env.allowRemoteModels = false; env.localModelPath = '/tmp/tjs/';
const texts = [
  "Hello world", "  leading spaces, trailing spaces   ", "Whitespace   runs\t\tand\n\n\nnew lines    are   kept.\n",
  "Unicode: café, naïve, Größe, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, emoji 🙂🚀 and 👩‍👩‍👧.",
  "Numbers 1234567 and 3.14159, dates 2026-11-22.", "Contractions: it's, they'll, WE'VE, I'm, you'd. IT'S 'tis",
  "code:\n    def f(x):\n\treturn x  # comment\n", " ", "\n", "a", "\r\n\r\n x \r y",
  "nbsp\u00a0and\u3000ideographic\u2003em spaces", "combining e\u0301 and precomposed \u00e9", "tabs\t\t\tthen text",
  "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs into the forest.",
  "specials <|end_of_text|>glued<|begin_of_text|> and <|im_start|>user\nhi<|im_end|> <|endoftext|> <s> </s>",
  "mixed123abc 12 1 1234 ١٢٣ arabic digits", "punctuation!!! ??? ... --- (((x))) \"quoted\" 'single'",
];
const out = { texts, tokenizers: {} };
for (const name of ['llama3', 'qwen2', 'gpt2']) {
  const tok = await AutoTokenizer.from_pretrained('m_' + name);
  const cases = texts.map(t => {
    const ids = tok.encode(t);
    const plain = tok.encode(t, { add_special_tokens: false });
    return { with_special: ids, plain, decoded: tok.decode(plain, { clean_up_tokenization_spaces: false }) };
  });
  out.tokenizers[name] = { tokenizer_json: JSON.parse(fs.readFileSync(`/tmp/tjs/m_${name}/tokenizer.json`, 'utf8')), cases };
}
fs.writeFileSync('/work/main/tests/model/data/tokenizer_golden.json', JSON.stringify(out));
console.log('ok', fs.statSync('/work/main/tests/model/data/tokenizer_golden.json').size);
