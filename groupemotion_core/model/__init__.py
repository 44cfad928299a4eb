"""The paper's network (section 4): its typed config, the two encoders, the fusion block, the classifier, and the training pieces of section 5."""
