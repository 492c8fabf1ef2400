"""QA datasets: the embedded dataset, loaders for SQuAD/MLQA/CSQA/Dolly, prompt templates."""
