"""Networks: I-frame ENet, P-frame branches, ConvLSTM, the composed segmenter."""
