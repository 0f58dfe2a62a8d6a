"""StarCoder2's special tokens (same names and order as the real tokenizer) and its FIM prompt."""

EOS = "<|endoftext|>"
FIM_PREFIX = "<fim_prefix>"
FIM_MIDDLE = "<fim_middle>"
FIM_SUFFIX = "<fim_suffix>"
FIM_PAD = "<fim_pad>"
FILE_SEP = "<file_sep>"
REPO_NAME = "<repo_name>"

SPECIAL_TOKENS = (
    EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP,
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
    "<code_to_intermediate>", "<intermediate_to_code>", "<pr>", "<pr_status>", "<pr_is_merged>",
    "<pr_base>", "<pr_file>", "<pr_base_code>", "<pr_diff>", "<pr_diff_hunk>", "<pr_comment>",
    "<pr_event_id>", "<pr_review>", "<pr_review_state>", "<pr_review_comment>",
    "<pr_in_reply_to_review_id>", "<pr_in_reply_to_comment_id>", "<pr_diff_hunk_comment_line>",
    "<NAME>", "<EMAIL>", "<KEY>", "<PASSWORD>",
)

# Generation ends at these tokens (the end of a document, or the start of another file).
STOP_TOKENS = (EOS, FILE_SEP)


def repo_pieces(files: tuple[tuple[str, str], ...], repo: str = "") -> list[tuple[str, bool]]:
    """Other files of the project as (text, special) pieces, in StarCoder2's repository format
    (`<repo_name>repo<file_sep>name\ntext...<file_sep>`), to precede the file being edited; none
    without files."""
    if not files:
        return []
    pieces: list[tuple[str, bool]] = [(REPO_NAME, True), (repo, False)]
    for name, text in files:
        pieces += [(FILE_SEP, True), (f"{name}\n{text}", False)]
    return [*pieces, (FILE_SEP, True)]


def fim_pieces(prefix: str, suffix: str, files: tuple[tuple[str, str], ...] = (), repo: str = "") -> list[tuple[str, bool]]:
    """StarCoder2's fill-in-the-middle prompt (PSM order) as (text, special) pieces: each special piece
    is one token; the others are code, tokenized as text, so a `<fim_middle>` written in the code
    stays code (as llama-server tokenizes its /infill pieces). The model writes the middle.

    files: other files of the project as (name, text) (`repo_pieces`), as an editor plugin sends
    them (llama.cpp's `input_extra`)."""
    return [*repo_pieces(files, repo), (FIM_PREFIX, True), (prefix, False), (FIM_SUFFIX, True), (suffix, False),
            (FIM_MIDDLE, True)]


def fim_prompt(prefix: str, suffix: str, files: tuple[tuple[str, str], ...] = (), repo: str = "") -> str:
    """`fim_pieces` as one text (special tokens written out: encoded so, code that contains their
    strings is read as special tokens; the runtime encodes the pieces instead)."""
    return "".join(text for text, _ in fim_pieces(prefix, suffix, files, repo))
