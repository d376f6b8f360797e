"""The prompt of an /infill request, laid out as llama.cpp's server lays it out (format_prompt_infill):
the repository context first, then the family's fill-in-the-middle prompt around the cursor.

    [BOS] [<repo_name>myproject\\n] (<file_sep>FILENAME\\n TEXT | \\n\\n--- snippet ---\\n\\n TEXT)...
          [<file_sep>filename\\n] <fim_prefix> PREFIX PROMPT <fim_suffix> SUFFIX <fim_middle>

A family with repository-level tokens (StarCoder2's <repo_name> and <file_sep>, Qwen2.5-Coder's
<|repo_name|> and <|file_sep|>) gets them, with llama.cpp's placeholder names for the repository and
the current file; any other gets each chunk after a "--- snippet ---" line. The markers are the
family's own (suffix first for Codestral). Unlike llama.cpp, which puts the context before the BOS,
the BOS stays first, where the model saw it in training.

The budget is llama.cpp's rule within splitserve's limits. The room is what max_input_tokens and
max_total_tokens (less the request's n_predict) leave. The cursor's neighbourhood gets a batch of
FIM_BATCH tokens: the prefix keeps its last 3/4 of it, the suffix its first 1/4 less the prompt and
two markers, the prompt (the cursor's line) all of it. The repository context gets the room left
beside a whole batch, the BOS and markers, and GENERATION_RESERVE, and keeps its end. Neither budget depends on what the
other part holds, nor on the request's n_predict up to the reserve: so an editor's requests while it
types, and the n_predict 0 warm-up before them, cut the same context the same way, and their prompts
start alike, which is what the prefill workers' prefix cache keeps.
"""

from __future__ import annotations

from functools import lru_cache

from splitserve.common.fim import Fim

from .infill_schema import ExtraChunk

# The cursor's batch: llama.cpp's n_batch at the `-b 1024` that llama.vim's and llama.vscode's
# server presets use.
FIM_BATCH = 1024
# Generation room kept out of the repository context's share, whatever the request's n_predict (the
# editors ask for 128 at most by default): llama.cpp keeps twice its server-wide n_predict.
GENERATION_RESERVE = 256
REPOSITORY = "myproject\n"  # llama.cpp's placeholders: no API field names them
CURRENT_FILE = "filename\n"
SNIPPET = "\n\n--- snippet ---\n\n"  # a chunk's header where the family has no <file_sep>
ENCODED_PIECES = 1024  # editors resend the same context chunks with every keystroke: encode each once


class InfillPrompts:
    """Builds /infill prompts for one tokenizer's FIM layout."""

    def __init__(self, fim: Fim, max_input_tokens: int, max_total_tokens: int):
        self.fim, self.max_input, self.max_total = fim, max_input_tokens, max_total_tokens
        repo = fim.layout.repo  # (repository name, file separator), when the family has them
        self.repo_name = fim.repo_ids.get(repo[0]) if repo else None
        self.file_sep = fim.repo_ids.get(repo[1]) if repo else None
        self._encode = lru_cache(maxsize=ENCODED_PIECES)(lambda text: tuple(fim.suffix_ids(text)))

    def room(self, max_new_tokens: int) -> int:
        """Prompt tokens a request that generates `max_new_tokens` may have."""
        return min(self.max_input, self.max_total - max_new_tokens)

    def ids(self, prefix: str, prompt: str, suffix: str, extra: list[ExtraChunk], max_new_tokens: int) -> list[int]:
        """The prompt's ids: at most room(max_new_tokens) of them (just the BOS, markers and cursor line
        when even those don't fit; the request's limit check then says why)."""
        fim = self.fim
        room = self.room(max_new_tokens)
        batch = max(0, min(FIM_BATCH, room))
        # With no prefix, the cursor's line is the text's start (SentencePiece layouts' dummy prefix).
        prefix_ids = fim.prefix_ids(prefix) if prefix else []
        line = fim.suffix_ids(prompt) if prefix else fim.prefix_ids(prompt)
        keep_line = max(0, min(len(line), batch - fim.overhead))  # a line longer than the batch keeps its end
        line = line[len(line) - keep_line:]
        suffix_ids = fim.suffix_ids(suffix)
        near = max(0, room - fim.overhead - len(line))  # what the prefix and suffix may share at most
        n_suffix = min(len(suffix_ids), max(0, batch // 4 - 2 - len(line)), near)
        n_prefix = min(len(prefix_ids), 3 * batch // 4, near - n_suffix)
        context = self._context(extra)
        n_context = min(len(context), max(0, min(room, self.max_total - GENERATION_RESERVE) - batch - fim.overhead))

        pre = [fim.prefix_id, *prefix_ids[len(prefix_ids) - n_prefix:], *line]
        suf = [fim.suffix_id, *suffix_ids[:n_suffix]]
        body = suf + pre if fim.layout.suffix_first else pre + suf
        middle = [] if fim.middle_id is None else [fim.middle_id]
        return [*fim.tokenizer.leading_special_ids, *context[len(context) - n_context:], *body, *middle]

    def _context(self, extra: list[ExtraChunk]) -> list[int]:
        ids: list[int] = []
        if self.repo_name is not None:
            ids += [self.repo_name, *self._encode(REPOSITORY)]
        for chunk in extra:
            if self.file_sep is not None:
                ids += [self.file_sep, *self._encode(chunk.filename + "\n")]
            else:
                ids += self._encode(SNIPPET)
            ids += self._encode(chunk.text)
        if self.file_sep is not None:
            ids += [self.file_sep, *self._encode(CURRENT_FILE)]
        return ids
