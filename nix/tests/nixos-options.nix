# The NixOS options the modules under test read or set, declared with
# nixpkgs' real `lib.types`, with NixOS's types and defaults where they
# matter (users.users, users.groups, fileSystems, boot.initrd.extraFiles,
# environment.etc, system.activationScripts, ...), and the accounts NixOS
# itself declares (root, nobody; groups root, wheel, users, nogroup).
# Everything else in a NixOS system is left out: a module that touches
# an option not declared here fails to evaluate, as it would on NixOS if
# the option did not exist.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkDefault mkIf types;

  anything = types.attrsOf types.anything;

  userType = types.submodule ({ name, config, ... }: {
    options = {
      name = mkOption { type = types.str; default = name; };
      uid = mkOption { type = types.nullOr types.int; default = null; };
      group = mkOption { type = types.str; default = ""; };
      extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
      home = mkOption { type = types.passwdEntry types.path; default = "/var/empty"; };
      homeMode = mkOption { type = types.strMatching "[0-7]{1,5}"; default = "700"; };
      createHome = mkOption { type = types.bool; default = false; };
      isNormalUser = mkOption { type = types.bool; default = false; };
      isSystemUser = mkOption { type = types.bool; default = false; };
      description = mkOption { type = types.passwdEntry types.str; default = ""; };
      hashedPassword = mkOption { type = types.nullOr types.str; default = null; };
    };
    # As NixOS's users-groups.nix does for normal users.
    config = mkIf config.isNormalUser {
      group = mkDefault "users";
      createHome = mkDefault true;
      home = mkDefault "/home/${config.name}";
    };
  });

  groupType = types.submodule ({ name, ... }: {
    options = {
      name = mkOption { type = types.str; default = name; };
      gid = mkOption { type = types.nullOr types.int; default = null; };
      members = mkOption { type = types.listOf types.str; default = [ ]; };
    };
  });

  fileSystemType = types.submodule ({ name, ... }: {
    options = {
      mountPoint = mkOption { type = types.str; default = name; };
      device = mkOption { type = types.nullOr types.str; default = null; };
      label = mkOption { type = types.nullOr types.str; default = null; };
      fsType = mkOption { type = types.str; default = "auto"; };
      options = mkOption { type = types.nonEmptyListOf types.str; default = [ "defaults" ]; };
      neededForBoot = mkOption { type = types.bool; default = false; };
      depends = mkOption { type = types.listOf types.str; default = [ ]; };
      noCheck = mkOption { type = types.bool; default = false; };
    };
  });

  # nixos/modules/tasks/filesystems.nix: a list is still accepted.
  fsTypes = types.coercedTo (types.listOf types.str)
    (enabled: lib.listToAttrs (map (fs: lib.nameValuePair fs true) enabled))
    (types.attrsOf types.bool);

  etcType = types.submodule ({ name, config, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      target = mkOption { type = types.str; default = name; };
      text = mkOption { type = types.nullOr types.lines; default = null; };
      source = mkOption { type = types.path; };
      mode = mkOption { type = types.str; default = "symlink"; };
    };
    # As nixos/modules/system/etc/etc.nix: `text` makes the source.
    config.source = mkIf (config.text != null) (mkDefault (pkgs.writeText (baseNameOf name) config.text));
  });

  initrdContentsType = types.submodule ({ name, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      target = mkOption { type = types.path; default = name; };
      text = mkOption { type = types.nullOr types.lines; default = null; };
      source = mkOption { type = types.path; };
    };
  });

  # nixos/modules/system/activation/activation-script.nix
  scriptType = types.submodule {
    options = {
      deps = mkOption { type = types.listOf types.str; default = [ ]; };
      text = mkOption { type = types.lines; };
      supportsDryActivation = mkOption { type = types.bool; default = false; };
    };
  };
  activationType = types.attrsOf (types.coercedTo types.str lib.noDepEntry scriptType);
in
{
  options = {
    system.stateVersion = mkOption { type = types.str; default = "26.05"; };
    system.activationScripts = mkOption { type = activationType; default = { }; };

    users.users = mkOption { type = types.attrsOf userType; default = { }; };
    users.groups = mkOption { type = types.attrsOf groupType; default = { }; };
    users.mutableUsers = mkOption { type = types.bool; default = true; };

    fileSystems = mkOption { type = types.attrsOf fileSystemType; default = { }; };

    environment.etc = mkOption { type = types.attrsOf etcType; default = { }; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };

    systemd.services = mkOption { type = types.attrsOf anything; default = { }; };
    systemd.mounts = mkOption { type = types.listOf anything; default = [ ]; };

    boot.supportedFilesystems = mkOption { type = fsTypes; default = { }; };
    boot.initrd = {
      supportedFilesystems = mkOption { type = fsTypes; default = { }; };
      verbose = mkOption { type = types.bool; default = true; };
      postMountCommands = mkOption { type = types.lines; default = ""; };
      postDeviceCommands = mkOption { type = types.lines; default = ""; };
      # nixos/modules/system/boot/stage-1.nix (nixpkgs 24.05 and later):
      # after resuming from hibernation was tried, before the root is mounted.
      postResumeCommands = mkOption { type = types.lines; default = ""; };
      # nixos/modules/system/boot/stage-1.nix
      extraFiles = mkOption {
        type = types.attrsOf (types.submodule {
          options.source = mkOption { type = types.package; };
        });
        default = { };
      };
      systemd = {
        enable = mkOption { type = types.bool; default = false; };
        contents = mkOption { type = types.attrsOf initrdContentsType; default = { }; };
        storePaths = mkOption { type = types.listOf (types.either types.singleLineStr types.package); default = [ ]; };
        services = mkOption { type = types.attrsOf anything; default = { }; };
        mounts = mkOption { type = types.listOf anything; default = [ ]; };
        suppressedUnits = mkOption { type = types.listOf types.str; default = [ ]; };
      };
    };
  };

  config = {
    users.users.root = { uid = 0; group = "root"; home = "/root"; description = "System administrator"; };
    users.users.nobody = { uid = 65534; group = "nogroup"; isSystemUser = true; };
    users.groups = { root.gid = 0; wheel.gid = 1; users.gid = 100; nogroup.gid = 65534; };

    # NixOS's own snippets that others order themselves after.
    system.activationScripts = {
      specialfs = "# specialfs";
      users = { deps = [ ]; text = "# users"; };
      groups = { deps = [ "users" ]; text = "# groups"; };
      etc = { deps = [ "users" "groups" ]; text = "# etc"; };
    };
  };
}
