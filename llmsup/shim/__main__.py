from llmsup.shim.main import main

main()
