import sys

if sys.argv[1:2] == ["lease"] and sys.argv[2:3] in (["store"], ["pack"]):
    # a device call's first and last steps move files: without kdlib.cli's imports (torch...)
    from kdlib.lease.commands import main_light as main
else:
    from kdlib.cli import main

sys.exit(main())
