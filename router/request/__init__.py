"""The request vocabulary and its preparation: what a request is, its sampling parameters, the chat format,
tokenizing and incremental detokenizing. No torch."""
