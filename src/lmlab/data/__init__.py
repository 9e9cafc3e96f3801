from lmlab.data.datamodule import TextDataModule
from lmlab.data.tokenizers import CharTokenizer, TiktokenTokenizer, build_tokenizer

__all__ = ["CharTokenizer", "TextDataModule", "TiktokenTokenizer", "build_tokenizer"]
