"""The data path, in reading order: corpus.py reads a corpus and splits its documents into
train / val / test; tokenizers.py turns text into token ids; tokenization.py (which also cuts a
plain-text corpus at line breaks) tokenizes each part, or loads it from token_cache.py;
examples.py cuts the tokens into training examples and orders them; datamodule.py serves them."""

from lmlab.data.datamodule import TextDataModule
from lmlab.data.tokenizers import CharTokenizer, TiktokenTokenizer, build_tokenizer

__all__ = ["CharTokenizer", "TextDataModule", "TiktokenTokenizer", "build_tokenizer"]
