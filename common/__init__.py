"""Code shared by every splitserve process: config, protocol, model functions, tokenizer, sampling."""
