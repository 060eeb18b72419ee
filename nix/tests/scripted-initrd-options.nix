# The scripted stage 1's options (nixpkgs' modules/system/boot/stage-1.nix),
# deprecated since 26.05 and announced for removal in 26.11, and the
# assertion of modules/system/boot/systemd/initrd.nix that each of its
# hooks is empty when the systemd initrd is on.  eval.nix leaves this
# module out (`scriptedInitrd = false`) to stand for a nixpkgs without them.
{ config, lib, options, ... }:

let
  inherit (lib) mkOption types;
  hook = mkOption { type = types.lines; default = ""; };
  hooks = [
    [ "preFailCommands" ]
    [ "preDeviceCommands" ]
    [ "preLVMCommands" ]
    [ "postDeviceCommands" ]
    [ "postResumeCommands" ]
    [ "postMountCommands" ]
    [ "extraUtilsCommands" ]
    [ "extraUtilsCommandsTest" ]
  ];
in
{
  options.boot.initrd = {
    preFailCommands = hook;
    preDeviceCommands = hook;
    preLVMCommands = hook;
    postDeviceCommands = hook;
    # After resuming from hibernation was tried, before the root is mounted.
    postResumeCommands = hook;
    postMountCommands = hook;
    extraUtilsCommands = hook;
    extraUtilsCommandsTest = hook;
    extraFiles = mkOption {
      type = types.attrsOf (types.submodule {
        options.source = mkOption { type = types.package; };
      });
      default = { };
    };
  };

  config.assertions = lib.optionals config.boot.initrd.systemd.enable (map (name: {
    assertion = lib.attrByPath name (throw "impossible") config.boot.initrd == "";
    message = ''
      systemd stage 1 does not support 'boot.initrd.${lib.concatStringsSep "." name}'. Please
      convert it to analogous systemd units in 'boot.initrd.systemd'.

        Definitions:
        ${lib.concatMapStringsSep "\n" ({ file, ... }: "  - ${file}") (lib.attrByPath name (throw "impossible") options.boot.initrd).definitionsWithLocations}
    '';
  }) hooks);
}
