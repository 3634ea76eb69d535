"""Data: corpora -> tokenized MDS shards -> mixtures -> a stateless global order -> batches."""
