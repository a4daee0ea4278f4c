from dstcli.cli import main

main()
