"""QA accuracy and retention: SQuAD/MLQA EM-F1, CommonsenseQA accuracy, Rouge-L."""
