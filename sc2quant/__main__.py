from sc2quant.core.signals import defer_sigint

defer_sigint()  # before the slow imports: a Ctrl-C from now on is the command's to answer (exit 130)

from sc2quant.cli import main  # noqa: E402

main()
