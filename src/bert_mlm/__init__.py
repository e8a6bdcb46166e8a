from bert_mlm.data import MLMDataModule
from bert_mlm.errors import UserError
from bert_mlm.module import MLMModule

__all__ = ["MLMDataModule", "MLMModule", "UserError"]
