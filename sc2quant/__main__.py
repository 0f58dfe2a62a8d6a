from sc2quant.cli import main

main()
