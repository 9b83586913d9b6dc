# Port of pytorch/examples word_language_model/data.py: the Wikitext-2 files are replaced by
# sentences drawn from a tiny grammar with a seeded generator.
import random

import torch

SUBJECTS = ["the cat", "a dog", "my model", "the network", "a tensor", "our loss"]
VERBS = ["sees", "trains", "eats", "predicts", "likes", "drops"]
OBJECTS = ["the data", "a batch", "its loss", "the gradient", "a fish", "every epoch"]


class Dictionary:
    def __init__(self):
        self.word2idx = {}
        self.idx2word = []

    def add_word(self, word):
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]

    def __len__(self):
        return len(self.idx2word)


class Corpus:
    def __init__(self, seed, sentences=(160, 40, 40)):
        self.dictionary = Dictionary()
        rng = random.Random(seed)
        self.train, self.valid, self.test = (self.tokenize(self.generate(rng, n)) for n in sentences)

    @staticmethod
    def generate(rng, n):
        """n sentences of the grammar: subject verb object."""
        return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" for _ in range(n)]

    def tokenize(self, lines):
        """Tokenizes lines of text."""
        for line in lines:
            for word in line.split() + ["<eos>"]:
                self.dictionary.add_word(word)
        idss = []
        for line in lines:
            ids = [self.dictionary.word2idx[word] for word in line.split() + ["<eos>"]]
            idss.append(torch.tensor(ids).type(torch.int64))
        return torch.cat(idss)
