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


def fim_prompt(prefix: str, suffix: str, files: tuple[tuple[str, str], ...] = (), repo: str = "") -> str:
    """StarCoder2's fill-in-the-middle prompt (PSM order); the model writes the middle.

    files: other files of the project as (name, text), placed before the one being edited in
    StarCoder2's repository format (`<repo_name>repo<file_sep>name\ntext...<file_sep>`), as an
    editor plugin sends them (llama.cpp's `input_extra`)."""
    context = ""
    if files:
        context = f"{REPO_NAME}{repo}" + "".join(f"{FILE_SEP}{name}\n{text}" for name, text in files) + FILE_SEP
    return f"{context}{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
